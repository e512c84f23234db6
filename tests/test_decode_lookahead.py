"""The decode lookahead (layer 0 of the next greedy step started at the end of a decode forward) on the CPU
standing in for the accelerator: bit-identical results with and without it, for every family, in float32 and
bfloat16; misses when a logits processor changes the token; nothing left running after a call."""

import pytest
import torch
from test_decode_graphs import generate, prompt
from tiny_models import CONFIGS, DENSE_PLACEMENT, load_every_lane, placement_for
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

FAMILIES = sorted(CONFIGS)
# the forced dense placement streams layer 0's attention, which keeps layer 0 off the decode graphs (and so
# off the lookahead): stream layer 1's instead
DENSE_LAYER1 = {
    **{k: v for k, v in DENSE_PLACEMENT.items() if "attention" not in k},
    "layers.1.attention": "stream",
}


def placement(family):
    chosen = placement_for(family)
    return DENSE_LAYER1 if chosen is DENSE_PLACEMENT else chosen


def load(directory, family, **options):
    settings = dict(
        placement=placement(family),
        token_assignment="adaptive",
        max_batch_size=2,
        decode_graphs=True,
        decode_lookahead=True,
    )
    return load_every_lane(directory, family, **{**settings, **options})


def assert_bitwise(got, want):
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        assert torch.equal(a, b)


class ForceToken(LogitsProcessor):
    """Makes every third step's token 7 (so the argmax of the raw logits is not the token)."""

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] % 3 == 0:
            scores = scores.clone()
            scores[:, 7] = 1e4
        return scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lookahead_is_bitwise_invisible(tiny_checkpoints, family, dtype):
    directory = tiny_checkpoints[family]
    ids = prompt(batch=2, length=7, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in one row
    plain = load(directory, family, dtype=dtype, decode_lookahead=False)
    want = generate(plain, ids, new_tokens=8, attention_mask=mask)
    hybrid = load(directory, family, dtype=dtype)
    lookahead = hybrid.hybrid.decode_graphs.lookahead
    got = generate(hybrid, ids, new_tokens=8, attention_mask=mask)
    assert_bitwise(got, want)
    # it ran: every decode forward but the last started the next one's layer 0 (a miss only where
    # min_new_tokens kept an end-of-sequence argmax from being the token)
    assert lookahead.starts == 6
    assert lookahead.hits + lookahead.misses == lookahead.starts
    assert lookahead.hits >= 1
    assert hybrid.hybrid.executor.ahead is None


def test_float32_matches_transformers(tiny_checkpoints):
    directory = tiny_checkpoints["mixtral"]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hybrid = load(directory, "mixtral")
    ids = prompt(seed=5)
    want = generate(ref, ids, new_tokens=10)
    got = generate(hybrid, ids, new_tokens=10)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    assert hybrid.hybrid.decode_graphs.lookahead.hits == 8


def test_a_changed_token_is_a_miss_and_stops_the_lookahead(tiny_checkpoints):
    directory = tiny_checkpoints["mixtral"]
    ids = prompt(seed=7)
    plain = load(directory, "mixtral", decode_lookahead=False)
    hybrid = load(directory, "mixtral")
    lookahead = hybrid.hybrid.decode_graphs.lookahead
    processors = LogitsProcessorList([ForceToken()])
    want = generate(plain, ids, new_tokens=10, logits_processor=processors)
    got = generate(hybrid, ids, new_tokens=10, logits_processor=processors)
    assert_bitwise(got, want)
    assert lookahead.misses == 1  # then off for the rest of the call
    assert lookahead.starts == lookahead.hits + 1
    # the next call looks ahead again
    starts = lookahead.starts
    assert_bitwise(generate(hybrid, ids, new_tokens=6), generate(plain, ids, new_tokens=6))
    assert lookahead.starts == starts + 4


def test_sampling_and_switch_off_do_not_look_ahead(tiny_checkpoints):
    directory = tiny_checkpoints["olmoe"]
    hybrid = load(directory, "olmoe")
    lookahead = hybrid.hybrid.decode_graphs.lookahead
    ids = prompt(seed=2)
    torch.manual_seed(0)
    hybrid.generate(ids, max_new_tokens=6, do_sample=True, top_k=5)
    assert lookahead.starts == 0
    lookahead.enabled = False
    generate(hybrid, ids, new_tokens=6)
    assert lookahead.starts == 0
    lookahead.enabled = True
    generate(hybrid, ids, new_tokens=6)
    assert lookahead.starts == 4


def test_a_call_that_stops_early_leaves_nothing_running(tiny_checkpoints):
    """An end-of-sequence token ends the call with layer 0 of a step that will not come already started:
    it is finished and dropped, and the cache position generate saw was never moved."""
    directory = tiny_checkpoints["mixtral"]
    ids = prompt(seed=11)
    plain = load(directory, "mixtral", decode_lookahead=False)
    hybrid = load(directory, "mixtral")
    free = generate(plain, ids, new_tokens=10)
    stop = int(free.sequences[0, ids.shape[1] + 4])  # the 5th new token ends the call
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=stop, pad_token_id=0)
    want = plain.generate(ids, **kwargs)
    got = hybrid.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert got.shape[1] < ids.shape[1] + 10
    assert hybrid.hybrid.executor.ahead is None
    assert hybrid.hybrid.decode_graphs.lookahead.starts == 4  # the last one after the stopping token
    assert_bitwise(generate(hybrid, ids, new_tokens=8), generate(plain, ids, new_tokens=8))


def test_an_interrupted_call_drops_the_step_started_ahead(tiny_checkpoints):
    directory = tiny_checkpoints["mixtral"]
    ids = prompt(seed=13)
    plain = load(directory, "mixtral", decode_lookahead=False)
    hybrid = load(directory, "mixtral")

    class Interrupt:
        def __init__(self):
            self.puts = 0

        def put(self, value):
            self.puts += 1
            if self.puts == 4:  # the prompt, then three tokens: layer 0 of the next step is running
                raise KeyboardInterrupt

        def end(self):
            pass

    with pytest.raises(KeyboardInterrupt):
        generate(hybrid, ids, new_tokens=10, streamer=Interrupt())
    assert hybrid.hybrid.executor.ahead is None
    assert hybrid.hybrid.executor.start_only is False
    assert_bitwise(generate(hybrid, ids, new_tokens=8), generate(plain, ids, new_tokens=8))


def test_decode_lookahead_option_is_validated_and_off_by_default(tiny_checkpoints):
    with pytest.raises(TypeError, match="decode_lookahead must be True or False"):
        load(tiny_checkpoints["mixtral"], "mixtral", decode_lookahead="yes")
    hybrid = load_every_lane(tiny_checkpoints["mixtral"], placement=placement("mixtral"), decode_graphs=True)
    lookahead = hybrid.hybrid.decode_graphs.lookahead
    assert lookahead.enabled is False
    generate(hybrid, prompt(), new_tokens=6)
    assert lookahead.starts == 0
