/*
 * The CPU expert lane: all gated-MLP work of one layer step in ONE call.
 *
 *     y = down( act(gate(x)) * up(x) )     (act = SiLU)
 *
 * for a list of jobs (MoE experts with their routed tokens and routing weights, row slices of a dense MLP,
 * the CPU rows of an expert split between lanes), added into one fp32 output [ntokens, hidden].
 *
 * Why a kernel of its own: with 1-8 tokens per expert these products are matrix-vector products, bound by
 * DRAM reads of the weights. Issued as several torch ops per expert (linear, chunk, act, mul, linear, mul,
 * index_add) each op wakes the OpenMP team and streams one matrix, and the lane reached about 52 GB/s of
 * weight reads against a DRAM read bandwidth of about 126 GB/s. Here each weight row is read from DRAM once
 * and dotted with every token of its job while it is in cache, all jobs of the step share one parallel
 * region of two phases, and the threads are our own (no OpenMP: they must not share a team with torch's).
 * Measured on a 16-core Xeon (AVX-512 BF16), two Mixtral experts (H 4096, I 14336, bf16), 16 threads:
 * 121/117/113/80 GB/s for 1/2/4/8 tokens per expert, against 53/51/36/36 GB/s for the torch ops.
 *
 *   phase 1: for every job and intermediate row j: g = x.gate_j, u = x.up_j for every token of the job,
 *            h[t][j] = silu(g) * u                      (work split by rows, equal bytes per row)
 *   barrier
 *   phase 2: for every hidden index c: y = h[t] . down_c for every job and token,
 *            out[token][c] += y * w                     (work split by hidden columns of out: each thread
 *                                                        writes its own columns, so no atomics)
 *
 * Rounding follows what torch computes in bf16 (every op's output rounded to bf16, round-to-nearest-even,
 * products and sums inside an op in fp32), so results match torch's within the summation order.
 *
 * Instruction set: chosen at compile time. The library is built on the machine that runs it with
 * -march=native, so the compiler's predefined macros say what the CPU has:
 *   __AVX512BF16__ : AVX-512, and VDPBF16PS for bf16 x bf16 products (exact in fp32, so only the summation
 *                    order differs from the widen-and-FMA path)
 *   __AVX512F__    : AVX-512 widen bf16 -> fp32 and FMA
 *   __AVX2__+__FMA__: the same with 256-bit vectors
 *   otherwise      : plain C
 *
 * AMX-BF16 (where the CPU has it, e.g. Sapphire Rapids): jobs with many tokens (prefill) are compute-bound
 * matrix products, not matrix-vector ones. For them both phases run on AMX tiles: each weight block is
 * packed once into the tiles' pair-interleaved layout and multiplied with every 16-token tile of the job,
 * so each weight is read once for all of a job's tokens at a rate the vector units cannot reach (torch's
 * per-expert ops reached about 0.8 TFLOP/s in-process on such a CPU). The tile code is written against a
 * few macros; built with -DHF_AMX_EMULATE the tiles are plain arrays and the tile product is computed in
 * C, so that the packing and edge handling are tested on machines without AMX.
 *
 * Calls: hf_lane_run makes a call on the calling thread (it takes part as thread 0). hf_lane_start hands the
 * same call to the pool's leader thread (started on first use; it takes thread 0's part) and returns at
 * once; hf_lane_wait sleeps until it is done. The executor's feeding thread starts a decode step's CPU work
 * this way, so no other Python thread has to wake (and take the interpreter lock) between the step's
 * routing and the kernel, or between the kernel's end and the join.
 *
 * C11 + POSIX threads; no torch or Python headers (the library is loaded with ctypes, which releases the
 * GIL for the duration of a call).
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* syscall() */

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define HF_ISA_AVX512 1
#define HF_MAX_ACC 16 /* accumulator registers a micro-kernel may use (32 zmm registers) */
#if defined(__AVX512BF16__)
#define HF_HAVE_DPBF16 1
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define HF_ISA_AVX2 1
#define HF_MAX_ACC 8 /* 16 ymm registers: 8 accumulators, the widened weights and x operands */
#else
#define HF_MAX_ACC 8
#endif

#define HF_INLINE static inline __attribute__((always_inline))

/* A phase's unit of work ("chunk") is at most HF_ROWS_MAX weight rows (phase 1: 64 gate/up pairs; phase 2:
 * 128 hidden columns), processed HF_TOK_GROUP tokens at a time; each thread's scratch holds the dot
 * products of one such panel. */
#define HF_ROWS_MAX 128
#define HF_TOK_GROUP 64
/* Target weight bytes per chunk. Chunks are taken in turn from a shared counter, so a phase ends at most
 * about one chunk's read time apart across threads (128 KiB at ~8 GB/s per core: ~16 us) while the
 * counter is touched rarely. */
#define HF_CHUNK_BYTES (128 * 1024)
#define HF_ABI_VERSION 5

/* ------------------------------------------------------------------------------------------------------ */
/* Public types                                                                                           */

typedef struct hf_job {
    const void *gate;      /* rows [0, r) of the gate matrix, each `hidden` long, row stride ld_gate_up  */
    const void *up;        /* rows [0, r) of the up matrix, same layout                                   */
    const void *down;      /* [hidden, ld_down] row-major; columns [0, r) are used                        */
    const int64_t *tokens; /* [ntok] row indices into x (repeats allowed), or NULL = rows 0..ntokens-1    */
    const void *weights;   /* [ntok] routing weight per selected token (weight_dtype), or NULL = 1        */
    const int64_t *weight_index; /* [ntok] positions into weights (of nweights), or NULL = 0..ntok-1     */
    int64_t ld_gate_up;    /* row stride of gate and up, in elements (>= hidden)                          */
    int64_t ld_down;       /* row stride of down, in elements (>= r)                                      */
    int64_t r;             /* intermediate rows of this job                                               */
    int64_t ntok;          /* tokens of this job (== ntokens when tokens is NULL)                         */
    int64_t nweights;      /* elements of weights when weight_index is set (checked against it)           */
    int32_t round_bf16;    /* 1: round every op's output to bf16 as torch does (bf16 dtype only)          */
    int32_t weight_bf16;   /* 1: the routing-weight product is rounded to bf16 (bf16 routing weights)     */
    int32_t partial;       /* 1: one part of a sum split across lanes: keep the down output in fp32       */
    int32_t act;           /* 0 = SiLU (the only one)                                                     */
    int32_t weight_dtype;  /* storage of weights: 0 = fp32, 1 = bf16                                      */
    int32_t reserved;      /* 0                                                                           */
} hf_job;

enum {
    HF_OK = 0,
    HF_ERR_POOL = 1,
    HF_ERR_SHAPE = 2,
    HF_ERR_DTYPE = 3,
    HF_ERR_JOB = 4,
    HF_ERR_TOKEN = 5,
    HF_ERR_NOMEM = 6,
    HF_ERR_ACT = 7,
    HF_ERR_OPTION = 8,
    HF_ERR_BUSY = 9,   /* hf_lane_start: a started call has not been collected by hf_lane_wait yet */
    HF_ERR_IDLE = 10,  /* hf_lane_wait: no call was started */
    HF_PENDING = -1,   /* hf_lane_wait: the call is still running when the timeout ran out */
};

enum {
    HF_OPT_BARRIER_SPIN_US = 1, /* spin this long at the phase barrier before sleeping (default 50)       */
    HF_OPT_PREFETCH = 2,        /* software prefetch distance in bytes, 0 = off (default 1024)            */
    HF_OPT_DPBF16 = 3,          /* 1 = use VDPBF16PS where compiled in (default 0)                       */
    HF_OPT_MIN_BYTES = 4,       /* weight bytes per thread below which fewer threads take part            */
    HF_OPT_IDLE_SPIN_US = 5,    /* spin this long after a call before a worker sleeps (default 0)         */
    HF_OPT_K_BLOCK = 6,         /* k block in elements, a multiple of 32; 0 = from HF_X_BUDGET (default)  */
    HF_OPT_AMX_MIN_TOKENS = 7,  /* bf16 jobs of at least this many tokens run on AMX tiles (default 16)  */
    HF_OPT_WAIT_SPIN_US = 8,    /* hf_lane_wait spins this long before sleeping (default 0)               */
    HF_OPT_SHORT_ROW = 9,       /* rows of at most this many bytes are prefetched a pass ahead (16384)    */
};

/* ------------------------------------------------------------------------------------------------------ */
/* bf16 conversions                                                                                       */

HF_INLINE float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 -> bf16 bits, round to nearest even; NaN stays NaN (quiet), as torch's c10::BFloat16 does. */
HF_INLINE uint16_t f32_to_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

HF_INLINE float round_bf16(float f) { return bf16_to_f32(f32_to_bf16_bits(f)); }

HF_INLINE float silu(float v) { return v / (1.0f + expf(-v)); }

/* ------------------------------------------------------------------------------------------------------ */
/* Micro-kernels: res[i*TB + t] = dot(w[i][0:n], x[t][0:n]) for NR weight rows and TB activation rows.    */
/* NR and TB are compile-time constants at every call site (the dispatchers below), so the accumulator    */
/* arrays are unrolled into registers. Each weight element is loaded once and used for TB tokens; the x   */
/* rows come from L1 or L2 (panel() bounds their bytes). The tail (n mod vector width) is summed in C.   */

#if defined(HF_ISA_AVX512)

HF_INLINE __m512 widen16(const uint16_t *p) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* Loop order inside a step: the NR weight vectors first, then one load of each token's x vector feeding NR
 * FMAs. x comes from L2 once there are more than a few tokens, so each x load must serve several rows:
 * with NR = 4 a step is 4 weight loads and TB x loads for 4 * TB FMAs. */
HF_INLINE void mk_bf16(const uint16_t *const *w, const float *const *x, int64_t n, int64_t pf, float *res,
                       const int NR, const int TB) {
    __m512 acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) acc[i][t] = _mm512_setzero_ps();
    int64_t k = 0;
    /* 32 elements = one 64-byte line of each bf16 row per iteration */
    for (; k + 32 <= n; k += 32) {
        if (pf)
            for (int i = 0; i < NR; i++) __builtin_prefetch((const char *)(w[i] + k) + pf, 0, 3);
        for (int h = 0; h < 32; h += 16) {
            __m512 wv[4];
            for (int i = 0; i < NR; i++) wv[i] = widen16(w[i] + k + h);
            for (int t = 0; t < TB; t++) {
                const __m512 xv = _mm512_loadu_ps(x[t] + k + h);
                for (int i = 0; i < NR; i++) acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
            }
        }
    }
    for (; k + 16 <= n; k += 16) {
        __m512 wv[4];
        for (int i = 0; i < NR; i++) wv[i] = widen16(w[i] + k);
        for (int t = 0; t < TB; t++) {
            const __m512 xv = _mm512_loadu_ps(x[t] + k);
            for (int i = 0; i < NR; i++) acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) {
            float s = 0.0f;
            for (int64_t kk = k; kk < n; kk++) s += bf16_to_f32(w[i][kk]) * x[t][kk];
            res[i * TB + t] = _mm512_reduce_add_ps(acc[i][t]) + s;
        }
}

HF_INLINE void mk_f32(const float *const *w, const float *const *x, int64_t n, int64_t pf, float *res,
                      const int NR, const int TB) {
    __m512 acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) acc[i][t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        if (pf)
            for (int i = 0; i < NR; i++) __builtin_prefetch((const char *)(w[i] + k) + pf, 0, 3);
        __m512 wv[4];
        for (int i = 0; i < NR; i++) wv[i] = _mm512_loadu_ps(w[i] + k);
        for (int t = 0; t < TB; t++) {
            const __m512 xv = _mm512_loadu_ps(x[t] + k);
            for (int i = 0; i < NR; i++) acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) {
            float s = 0.0f;
            for (int64_t kk = k; kk < n; kk++) s += w[i][kk] * x[t][kk];
            res[i * TB + t] = _mm512_reduce_add_ps(acc[i][t]) + s;
        }
}

#if defined(HF_HAVE_DPBF16)
/* bf16 weights x bf16 activations with VDPBF16PS: each pair product of two bf16 values is exact in fp32,
 * so this differs from mk_bf16 only in the order of the fp32 sums (and flushes fp32 denormals to zero).
 * Half the instructions of widen + FMA, and half the activation bytes to load. */
HF_INLINE void mk_dp(const uint16_t *const *w, const uint16_t *const *x, int64_t n, int64_t pf, float *res,
                     const int NR, const int TB) {
    __m512 acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) acc[i][t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        if (pf)
            for (int i = 0; i < NR; i++) __builtin_prefetch((const char *)(w[i] + k) + pf, 0, 3);
        __m512bh wv[4];
        for (int i = 0; i < NR; i++) wv[i] = (__m512bh)_mm512_loadu_si512((const void *)(w[i] + k));
        for (int t = 0; t < TB; t++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x[t] + k));
            for (int i = 0; i < NR; i++) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], wv[i], xv);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) {
            float s = 0.0f;
            for (int64_t kk = k; kk < n; kk++) s += bf16_to_f32(w[i][kk]) * bf16_to_f32(x[t][kk]);
            res[i * TB + t] = _mm512_reduce_add_ps(acc[i][t]) + s;
        }
}
#endif

#elif defined(HF_ISA_AVX2)

HF_INLINE __m256 widen8(const uint16_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

HF_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

HF_INLINE void mk_bf16(const uint16_t *const *w, const float *const *x, int64_t n, int64_t pf, float *res,
                       const int NR, const int TB) {
    __m256 acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) acc[i][t] = _mm256_setzero_ps();
    int64_t k = 0;
    /* 32 elements = one 64-byte line of each bf16 row per iteration */
    for (; k + 32 <= n; k += 32) {
        if (pf)
            for (int i = 0; i < NR; i++) __builtin_prefetch((const char *)(w[i] + k) + pf, 0, 3);
        for (int q = 0; q < 32; q += 8) {
            __m256 wv[4];
            for (int i = 0; i < NR; i++) wv[i] = widen8(w[i] + k + q);
            for (int t = 0; t < TB; t++) {
                const __m256 xv = _mm256_loadu_ps(x[t] + k + q);
                for (int i = 0; i < NR; i++) acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
            }
        }
    }
    for (; k + 8 <= n; k += 8) {
        __m256 wv[4];
        for (int i = 0; i < NR; i++) wv[i] = widen8(w[i] + k);
        for (int t = 0; t < TB; t++) {
            const __m256 xv = _mm256_loadu_ps(x[t] + k);
            for (int i = 0; i < NR; i++) acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) {
            float s = 0.0f;
            for (int64_t kk = k; kk < n; kk++) s += bf16_to_f32(w[i][kk]) * x[t][kk];
            res[i * TB + t] = hsum256(acc[i][t]) + s;
        }
}

HF_INLINE void mk_f32(const float *const *w, const float *const *x, int64_t n, int64_t pf, float *res,
                      const int NR, const int TB) {
    __m256 acc[4][4];
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) acc[i][t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        if (pf)
            for (int i = 0; i < NR; i++) __builtin_prefetch((const char *)(w[i] + k) + pf, 0, 3);
        for (int q = 0; q < 16; q += 8) {
            __m256 wv[4];
            for (int i = 0; i < NR; i++) wv[i] = _mm256_loadu_ps(w[i] + k + q);
            for (int t = 0; t < TB; t++) {
                const __m256 xv = _mm256_loadu_ps(x[t] + k + q);
                for (int i = 0; i < NR; i++) acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
            }
        }
    }
    for (; k + 8 <= n; k += 8) {
        __m256 wv[4];
        for (int i = 0; i < NR; i++) wv[i] = _mm256_loadu_ps(w[i] + k);
        for (int t = 0; t < TB; t++) {
            const __m256 xv = _mm256_loadu_ps(x[t] + k);
            for (int i = 0; i < NR; i++) acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) {
            float s = 0.0f;
            for (int64_t kk = k; kk < n; kk++) s += w[i][kk] * x[t][kk];
            res[i * TB + t] = hsum256(acc[i][t]) + s;
        }
}

#else /* plain C */

/* Eight partial sums per dot product, so that the compiler may vectorise for whatever the target has. */
HF_INLINE void mk_bf16(const uint16_t *const *w, const float *const *x, int64_t n, int64_t pf, float *res,
                       const int NR, const int TB) {
    (void)pf;
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) {
            float s[8] = {0};
            int64_t k = 0;
            for (; k + 8 <= n; k += 8)
                for (int q = 0; q < 8; q++) s[q] += bf16_to_f32(w[i][k + q]) * x[t][k + q];
            float tot = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
            for (; k < n; k++) tot += bf16_to_f32(w[i][k]) * x[t][k];
            res[i * TB + t] = tot;
        }
}

HF_INLINE void mk_f32(const float *const *w, const float *const *x, int64_t n, int64_t pf, float *res,
                      const int NR, const int TB) {
    (void)pf;
    for (int i = 0; i < NR; i++)
        for (int t = 0; t < TB; t++) {
            float s[8] = {0};
            int64_t k = 0;
            for (; k + 8 <= n; k += 8)
                for (int q = 0; q < 8; q++) s[q] += w[i][k + q] * x[t][k + q];
            float tot = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
            for (; k < n; k++) tot += w[i][k] * x[t][k];
            res[i * TB + t] = tot;
        }
}

#endif

/* Dispatch to a micro-kernel with constant NR in {2, 4} and TB in [1, 4], NR * TB <= HF_MAX_ACC (one
 * instance per pair: fewer instances compile faster). Any other pair, which the planner does not produce,
 * goes through (2, 1) in a loop. */
#if HF_MAX_ACC >= 16
#define HF_NR_CASES(CALL, LOOP)                                                                                \
    if (nr == 4 && tb >= 1 && tb <= 4) {                                                                       \
        switch (tb) {                                                                                          \
        case 1: CALL(4, 1); break;                                                                             \
        case 2: CALL(4, 2); break;                                                                             \
        case 3: CALL(4, 3); break;                                                                             \
        default: CALL(4, 4); break;                                                                            \
        }                                                                                                      \
    } else if (nr == 2 && tb >= 1 && tb <= 4) {                                                                \
        switch (tb) {                                                                                          \
        case 1: CALL(2, 1); break;                                                                             \
        case 2: CALL(2, 2); break;                                                                             \
        case 3: CALL(2, 3); break;                                                                             \
        default: CALL(2, 4); break;                                                                            \
        }                                                                                                      \
    } else {                                                                                                   \
        LOOP;                                                                                                  \
    }
#else
#define HF_NR_CASES(CALL, LOOP)                                                                                \
    if (nr == 4 && tb >= 1 && tb <= 2) {                                                                       \
        if (tb == 1) CALL(4, 1);                                                                               \
        else CALL(4, 2);                                                                                       \
    } else if (nr == 2 && tb >= 1 && tb <= 4) {                                                                \
        switch (tb) {                                                                                          \
        case 1: CALL(2, 1); break;                                                                             \
        case 2: CALL(2, 2); break;                                                                             \
        case 3: CALL(2, 3); break;                                                                             \
        default: CALL(2, 4); break;                                                                            \
        }                                                                                                      \
    } else {                                                                                                   \
        LOOP;                                                                                                  \
    }
#endif

/* res[i * tb + t] for nr rows (even) and tb tokens, one (2 rows, 1 token) micro-kernel at a time */
#define HF_PAIR_LOOP(MK, WT, XT)                                                                               \
    for (int i_ = 0; i_ + 1 < nr; i_ += 2)                                                                     \
        for (int t_ = 0; t_ < tb; t_++) {                                                                      \
            float two_[2];                                                                                     \
            MK((const WT *const *)(w + i_), (const XT *const *)(x + t_), n, pf, two_, 2, 1);                   \
            res[i_ * tb + t_] = two_[0];                                                                       \
            res[(i_ + 1) * tb + t_] = two_[1];                                                                 \
        }

static void kern_bf16(const uint16_t *const *w, int nr, const float *const *x, int tb, int64_t n, int64_t pf,
                      float *res) {
#define CALL_BF16(A, B) mk_bf16(w, x, n, pf, res, A, B)
    HF_NR_CASES(CALL_BF16, HF_PAIR_LOOP(mk_bf16, uint16_t, float))
#undef CALL_BF16
}

static void kern_f32(const float *const *w, int nr, const float *const *x, int tb, int64_t n, int64_t pf,
                     float *res) {
#define CALL_F32(A, B) mk_f32(w, x, n, pf, res, A, B)
    HF_NR_CASES(CALL_F32, HF_PAIR_LOOP(mk_f32, float, float))
#undef CALL_F32
}

#if defined(HF_HAVE_DPBF16)
static void kern_dp(const uint16_t *const *w, int nr, const uint16_t *const *x, int tb, int64_t n, int64_t pf,
                    float *res) {
#define CALL_DP(A, B) mk_dp(w, x, n, pf, res, A, B)
    HF_NR_CASES(CALL_DP, HF_PAIR_LOOP(mk_dp, uint16_t, uint16_t))
#undef CALL_DP
}
#endif

/* Rows per micro-kernel call and tokens per block for `ntok` tokens. AVX-512: always 4 rows x up to 4
 * tokens (16 accumulators; each x load feeds 4 FMAs, each weight load 4). 16-register targets: 4 rows x
 * 2 tokens when the tokens are few, else 2 rows x 4 tokens. Measured on a 16-core Xeon (AVX-512 BF16,
 * Mixtral shapes, 8 tokens): 2 rows x 8 tokens ran at 35 GFLOP/s a core, bound by loads of x, not FMAs. */
static int rows_per_pass(int64_t ntok) { return ntok * 4 <= HF_MAX_ACC || HF_MAX_ACC >= 16 ? 4 : 2; }

static int token_block(int64_t ntok, int nr) {
    int most = HF_MAX_ACC / nr;
    if (most > 4) most = 4;
    int64_t blocks = (ntok + most - 1) / most;
    return (int)((ntok + blocks - 1) / blocks); /* equal blocks: 33 tokens in 8s -> 7,7,7,6,6 */
}

/* ------------------------------------------------------------------------------------------------------ */
/* The pool                                                                                               */

typedef struct job_plan {
    const hf_job *job;
    int64_t hoff;       /* offset of this job's h rows in the h buffers (elements) */
    int64_t rpad;       /* row stride of h (r rounded up to 16 floats: a 64-byte line) */
    int64_t chunk0;     /* first phase-1 chunk of this job */
    int64_t nchunks;    /* phase-1 chunks of this job */
    int use_dp1;        /* phase 1 with VDPBF16PS */
    int use_dp2;        /* phase 2 with VDPBF16PS (h is exactly bf16) */
    int amx;            /* both phases on AMX tiles (bf16, rounded, many tokens) */
    int64_t rows1;      /* (gate, up) row pairs per phase-1 chunk */
    int64_t mpad;       /* AMX: tokens rounded up to a tile (16); h rows [ntok, mpad) are zeros */
    int64_t xoff;       /* AMX: offset of the job's gathered activations in xp (elements) */
    int64_t kb1, kb2;   /* AMX: k block of phase 1 and phase 2 (elements, a multiple of 32) */
    int rnd;            /* round to bf16 (bf16 dtype and round_bf16) */
} job_plan;

struct lane_pool;

typedef struct worker {
    pthread_t tid;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_ulong seq; /* bumped by whoever wakes this worker (under mu) */
    struct lane_pool *pool;
    int index; /* thread index, 1..nthreads-1 (0 is the calling thread) */
    int started;
} worker;

typedef struct lane_pool {
    int nthreads;
    worker *workers; /* nthreads - 1 */
    pthread_mutex_t run_mu; /* one call at a time */

    /* options */
    int barrier_spin_us;
    atomic_int idle_spin_us; /* workers and the leader, after a call */
    atomic_int wait_spin_us; /* the caller in hf_lane_wait */
    int64_t prefetch;
    int64_t short_row; /* see prefetch_distance */
    int dpbf16;
    int64_t min_bytes;
    int64_t k_block;
    int64_t amx_min_tokens;
    int amx_ok; /* AMX compiled in and usable in this process */

    /* the call in progress, written by the caller before workers are woken */
    atomic_int stop; /* set once by hf_lane_destroy */
    int nactive;
    const hf_job *jobs;
    int njobs;
    job_plan *plans;
    int64_t plans_cap;
    int dtype;
    int64_t ntokens, hidden;
    const void *x;
    const float *xf; /* fp32 copy of x (bf16 dtype, widen path), else x itself */
    float *out;
    float *hf;      /* h of all jobs, fp32 */
    uint16_t *hb;   /* h of all jobs, bf16 (VDPBF16PS path) */
    int64_t rows_per_chunk1, nchunks1;
    int64_t cols_per_chunk2, nchunks2;
    atomic_llong next1, next2;
    int amx_jobs;          /* jobs of this call on AMX tiles */
    int64_t hpad;          /* hidden rounded up to 32 (AMX panels' row length) */
    const uint16_t *xp;    /* AMX jobs' activations, gathered: [mpad, hpad] per job, zero padded */
    size_t amx_stride;     /* bytes of one thread's AMX scratch (packed weights, then fp32 sums) */
    size_t amx_bp_bytes;   /* of which packed weights */

    /* buffers kept between calls */
    float *xf_buf;
    int64_t xf_cap;
    float *scratch; /* nthreads * HF_ROWS_MAX * HF_TOK_GROUP */
    float *hf_buf;
    int64_t hf_cap;
    uint16_t *hb_buf;
    int64_t hb_cap;
    uint16_t *xp_buf;
    int64_t xp_cap;
    unsigned char *amx_buf;
    int64_t amx_cap;

    /* barrier between the phases */
    atomic_int bar_count;
    atomic_uint bar_gen;
    pthread_mutex_t bar_mu;
    pthread_cond_t bar_cv;

    /* timings of the last call, as the calling thread saw them (microseconds) */
    double t_start, t_barrier, t_end;
    int64_t last_bytes;
    int last_amx_jobs;

    /* completion */
    atomic_int remaining;
    pthread_mutex_t done_mu;
    pthread_cond_t done_cv;

    /* an asynchronous call (hf_lane_start / hf_lane_wait): the pool's leader thread makes it, playing the
     * calling thread's part, so the caller returns at once and sleeps only when it wants the result */
    pthread_mutex_t async_mu;
    pthread_cond_t async_cv;      /* the leader waits here for a request */
    pthread_cond_t async_done_cv; /* the caller waits here for the result (CLOCK_MONOTONIC) */
    pthread_t leader;
    int leader_started, leader_stop;
    int async_state; /* 0 idle, 1 requested, 2 running, 3 done and not collected */
    int async_rc, a_zero, a_njobs, a_dtype;
    const hf_job *a_jobs;
    const void *a_x;
    int64_t a_ntokens, a_hidden;
    float *a_out;
    double a_t_start, a_t_end;
} lane_pool;

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

HF_INLINE void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Spin up to `us` microseconds while *flag == value; returns 1 if it changed. */
static int spin_while_uint(atomic_uint *flag, unsigned value, int us) {
    if (us <= 0) return 0;
    double end = now_us() + us;
    for (int i = 0;; i++) {
        if (atomic_load_explicit(flag, memory_order_acquire) != value) return 1;
        cpu_relax();
        if ((i & 63) == 63 && now_us() > end) return 0;
    }
}

static int spin_while_nonzero(atomic_int *v, int us) {
    if (us <= 0) return 0;
    double end = now_us() + us;
    for (int i = 0;; i++) {
        if (atomic_load_explicit(v, memory_order_acquire) == 0) return 1;
        cpu_relax();
        if ((i & 63) == 63 && now_us() > end) return 0;
    }
}

/* All `nactive` threads meet here between the phases. The last to arrive opens it. Threads that arrive
 * early spin briefly: with dynamic chunking every thread ends phase 1 within about one chunk's time
 * (tens of microseconds) of the others, which is shorter than a sleep and wake-up through the kernel. */
static void barrier_wait(lane_pool *p) {
    if (p->nactive <= 1) return;
    unsigned gen = atomic_load_explicit(&p->bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->bar_count, 1, memory_order_acq_rel) + 1 == p->nactive) {
        atomic_store_explicit(&p->bar_count, 0, memory_order_relaxed);
        pthread_mutex_lock(&p->bar_mu);
        atomic_store_explicit(&p->bar_gen, gen + 1, memory_order_release);
        pthread_cond_broadcast(&p->bar_cv);
        pthread_mutex_unlock(&p->bar_mu);
        return;
    }
    if (spin_while_uint(&p->bar_gen, gen, p->barrier_spin_us)) return;
    pthread_mutex_lock(&p->bar_mu);
    while (atomic_load_explicit(&p->bar_gen, memory_order_acquire) == gen) pthread_cond_wait(&p->bar_cv, &p->bar_mu);
    pthread_mutex_unlock(&p->bar_mu);
}

/* ------------------------------------------------------------------------------------------------------ */
/* Panels: dot products of up to HF_ROWS_MAX weight rows with up to HF_TOK_GROUP activation rows          */

/* Blocking along k bounds the activation bytes one pass touches (tokens x block x element size) so that
 * they stay in L2 (1-2 MiB a core on current x86 servers) while the weights stream. A smaller, L1-sized
 * block was measured slower: with 8-32 tokens it meant a micro-kernel call (and its horizontal sums) every
 * few hundred elements, and the calls' overhead cost more than L2 loads. */
#define HF_X_BUDGET (256 * 1024)

/* The software prefetch distance for a pass over rows[0, nr) of `bytes` each (`more` rows from rows[0] on).
 * Along a long row, `distance` bytes ahead. A short row (at most `short_row` bytes: the rows of a small
 * expert, 1.5 KiB down rows and 4 KiB gate/up rows for Qwen3-MoE) ends soon after that prefetch starts, and
 * the next pass would begin on lines nobody asked for: where the next pass's rows follow at one fixed
 * stride, prefetch the same position in them instead. Measured with benchmarks/native_lane_bench.py on a
 * 2-core AMD EPYC (Zen 4), one token: Qwen3-MoE experts 10.3-10.6 -> 12.1-12.3 GB/s on one thread and
 * 19.0-19.5 -> 21.0-21.6 GB/s on two; Phi-3.5-MoE's 8 KiB gate/up rows +10% in their phase; Mixtral's
 * experts unchanged to +8%. */
static int64_t prefetch_distance(int64_t distance, int64_t short_row, const void *const *rows, int more, int nr,
                                 int64_t bytes) {
    if (distance == 0 || bytes > short_row || more < 2 * nr) return distance;
    const ptrdiff_t stride = (const char *)rows[nr] - (const char *)rows[0];
    for (int q = 1; q < nr; q++)
        if ((const char *)rows[nr + q] - (const char *)rows[q] != stride) return distance;
    return (int64_t)stride;
}

static void panel(const lane_pool *p, const void *const *rows, int nrows, const void *const *xs, int ntx,
                  int64_t n, int kind, float *res) {
    /* kind: 0 = fp32 weights and x, 1 = bf16 weights and fp32 x (widen), 2 = bf16 weights and x (VDPBF16PS) */
    const size_t wsz = kind == 0 ? 4 : 2, xsz = kind == 2 ? 2 : 4;
    const int nr_pass = rows_per_pass(ntx);
    const int tbmax = token_block(ntx, nr_pass);
    int64_t kb = ((int64_t)HF_X_BUDGET / ((int64_t)ntx * (int64_t)xsz)) & ~(int64_t)31;
    if (kb < 1024) kb = 1024; /* shorter blocks would spend more on calls and sums than they save */
    if (p->k_block > 0) kb = p->k_block;
    if (kb >= n) kb = n;
    float tmp[HF_MAX_ACC];
    const void *w[4];
    const void *xk[8];
    for (int i = 0; i < nrows * ntx; i++) res[i] = 0.0f;
    for (int64_t k0 = 0; k0 < n; k0 += kb) {
        const int64_t len = n - k0 < kb ? n - k0 : kb;
        for (int i = 0; i < nrows;) {
            const int rem = nrows - i;
            /* a single last row goes through the 2-row kernel with itself as the second row */
            const int nr = rem >= nr_pass ? nr_pass : 2, real = rem < nr ? rem : nr;
            for (int q = 0; q < nr; q++) w[q] = (const char *)rows[i + (q < real ? q : 0)] + (size_t)k0 * wsz;
            const int64_t pf =
                prefetch_distance(p->prefetch, p->short_row, rows + i, nrows - i, nr, len * (int64_t)wsz);
            /* nr <= nr_pass, so nr * tb <= HF_MAX_ACC (token_block) */
            for (int t0 = 0; t0 < ntx; t0 += tbmax) {
                const int tb = ntx - t0 < tbmax ? ntx - t0 : tbmax;
                for (int t = 0; t < tb; t++) xk[t] = (const char *)xs[t0 + t] + (size_t)k0 * xsz;
                switch (kind) {
                case 0: kern_f32((const float *const *)w, nr, (const float *const *)xk, tb, len, pf, tmp); break;
                case 1: kern_bf16((const uint16_t *const *)w, nr, (const float *const *)xk, tb, len, pf, tmp); break;
#if defined(HF_HAVE_DPBF16)
                case 2: kern_dp((const uint16_t *const *)w, nr, (const uint16_t *const *)xk, tb, len, pf, tmp); break;
#endif
                default: break;
                }
                for (int q = 0; q < real; q++)
                    for (int t = 0; t < tb; t++) res[(i + q) * ntx + t0 + t] += tmp[q * tb + t];
            }
            i += real;
        }
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* AMX-BF16 tiles: C[16 x 16 fp32] += A[16 x 32 bf16] . B[32 x 16 bf16] per TDPBF16PS                    */
/*                                                                                                        */
/* Both phases of an AMX job are one product shape: sums[mpad][32] = A[mpad][K] . W[32 rows][K]^T, where  */
/* A is the job's gathered activations (phase 1) or its h (phase 2), padded with zero rows to a multiple  */
/* of 16 and zero columns to a multiple of 32, and W is 16 gate rows and the 16 matching up rows (phase   */
/* 1) or 32 rows of down (phase 2; its columns are the k range). Eight tiles: four C (two token tiles x   */
/* two weight tiles), two A, two B; each A load feeds two products and so does each B load.               */

#if defined(HF_AMX_EMULATE)
#define HF_AMX 1
#define HF_AMX_EMU 1
#elif defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(HF_ISA_AVX512)
#define HF_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(HF_AMX)

/* the tile configuration (palette 1): every tile 16 rows of 64 bytes */
typedef struct hf_tilecfg {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) hf_tilecfg;

static const hf_tilecfg hf_tiles_all16 = {
    1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

#if defined(HF_AMX_EMU)
/* Tiles as per-thread arrays, as the hardware keeps them per thread; a tile instruction before this
 * thread loaded a configuration traps, as it does on the hardware (#UD), so a thread that forgets its own
 * configuration fails the tests here too. */
typedef struct emu_tile {
    int rows, colsb;
    unsigned char d[16][64];
} emu_tile;
static _Thread_local emu_tile emu_t[8];
static _Thread_local int emu_configured;

static void emu_loadconfig(const hf_tilecfg *c) {
    for (int i = 0; i < 8; i++) {
        emu_t[i].rows = c->rows[i];
        emu_t[i].colsb = c->colsb[i];
    }
    emu_configured = 1;
}

static void emu_check(void) {
    if (!emu_configured) __builtin_trap();
}

static void emu_load(int t, const void *base, int64_t stride) {
    emu_check();
    for (int r = 0; r < emu_t[t].rows; r++) memcpy(emu_t[t].d[r], (const char *)base + r * stride, (size_t)emu_t[t].colsb);
}

static void emu_store(int t, void *base, int64_t stride) {
    emu_check();
    for (int r = 0; r < emu_t[t].rows; r++) memcpy((char *)base + r * stride, emu_t[t].d[r], (size_t)emu_t[t].colsb);
}

static void emu_zero(int t) {
    emu_check();
    memset(emu_t[t].d, 0, sizeof emu_t[t].d);
}

/* TDPBF16PS: for each pair k of A's row m and B's row k: C[m][n] += A[m][2k] B[k][2n] + A[m][2k+1] B[k][2n+1],
 * products exact in fp32, sums in fp32 */
static void emu_dp(int c, int a, int b) {
    emu_check();
    const int m_rows = emu_t[a].rows, pairs = emu_t[a].colsb / 4, n_cols = emu_t[c].colsb / 4;
    for (int m = 0; m < m_rows; m++) {
        uint16_t arow[32];
        memcpy(arow, emu_t[a].d[m], sizeof arow);
        for (int n = 0; n < n_cols; n++) {
            float acc;
            memcpy(&acc, emu_t[c].d[m] + 4 * n, sizeof acc);
            for (int k = 0; k < pairs; k++) {
                uint16_t bb[2];
                memcpy(bb, emu_t[b].d[k] + 4 * n, sizeof bb);
                acc += bf16_to_f32(arow[2 * k]) * bf16_to_f32(bb[0]);
                acc += bf16_to_f32(arow[2 * k + 1]) * bf16_to_f32(bb[1]);
            }
            memcpy(emu_t[c].d[m] + 4 * n, &acc, sizeof acc);
        }
    }
}

#define HF_T_LOADCFG(cfg) emu_loadconfig(cfg)
#define HF_T_RELEASE() (emu_configured = 0)
#define HF_T_ZERO(t) emu_zero(t)
#define HF_T_LOAD(t, base, stride) emu_load(t, base, stride)
#define HF_T_STORE(t, base, stride) emu_store(t, base, stride)
#define HF_T_DP(c, a, b) emu_dp(c, a, b)

static int amx_usable(void) { return 1; }

#else /* the hardware */

#define HF_T_LOADCFG(cfg) _tile_loadconfig(cfg)
#define HF_T_RELEASE() _tile_release()
#define HF_T_ZERO(t) _tile_zero(t)
#define HF_T_LOAD(t, base, stride) _tile_loadd(t, base, stride)
#define HF_T_STORE(t, base, stride) _tile_stored(t, base, stride)
#define HF_T_DP(c, a, b) _tile_dpbf16ps(c, a, b)

static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static int amx_ok;

/* cpuid says AMX-TILE and AMX-BF16, and Linux lets this process use the tile data state (permission is
 * per process and must be asked for before any thread touches a tile; without it TILELOADD faults) */
static void amx_probe(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return; /* AMX-BF16, AMX-TILE */
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return;
    amx_ok = 1;
}

static int amx_usable(void) {
    pthread_once(&amx_once, amx_probe);
    return amx_ok;
}

#endif

/* One B tile of weights in the layout TDPBF16PS reads (pairs of k interleaved):
 * dst[k/2][2n + k%2] = w[n][k] for n < nrows, k < kvalid (<= 32), zero elsewhere. Row n's 32 values are 16
 * pairs, so this is a transpose of a 16 x 16 matrix of 32-bit pairs. */
#if defined(HF_ISA_AVX512) && defined(__AVX512BW__)
static void pack_b(uint16_t *dst, const uint16_t *w, int64_t ld, int nrows, int64_t kvalid) {
    const __mmask32 km = kvalid >= 32 ? 0xffffffffu : (((__mmask32)1 << kvalid) - 1);
    __m512i r[16], t[16];
    for (int n = 0; n < 16; n++)
        r[n] = n < nrows ? _mm512_maskz_loadu_epi16(km, w + n * ld) : _mm512_setzero_si512();
    /* pairs of rows interleaved, then quadruples: u[4g + c] holds rows 4g..4g+3 of pair columns c, c + 4,
     * c + 8, c + 12 in its four 128-bit lanes */
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) {
        r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
        r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
        r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
        r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    /* then the lanes: pair column c + 4L takes lane L of r[c], r[4 + c], r[8 + c], r[12 + c] */
    for (int c = 0; c < 4; c++) {
        const __m512i v = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), w2 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
        const __m512i v3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88), w3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
        _mm512_store_si512((void *)(dst + (c + 0) * 32), _mm512_shuffle_i32x4(v, v3, 0x88));
        _mm512_store_si512((void *)(dst + (c + 8) * 32), _mm512_shuffle_i32x4(v, v3, 0xDD));
        _mm512_store_si512((void *)(dst + (c + 4) * 32), _mm512_shuffle_i32x4(w2, w3, 0x88));
        _mm512_store_si512((void *)(dst + (c + 12) * 32), _mm512_shuffle_i32x4(w2, w3, 0xDD));
    }
}
#else
static void pack_b(uint16_t *dst, const uint16_t *w, int64_t ld, int nrows, int64_t kvalid) {
    for (int k = 0; k < 32; k++)
        for (int n = 0; n < 16; n++) dst[(k / 2) * 32 + 2 * n + (k % 2)] = n < nrows && k < kvalid ? w[n * ld + k] : 0;
}
#endif

/* acc[mtiles * 16][32] (+)= a[mtiles * 16][steps * 32] . packed weights (steps x two B tiles) */
static void amx_gemm(const uint16_t *a, int64_t lda, int64_t mtiles, const uint16_t *bp, int steps, float *acc,
                     int first) {
    const int64_t sa = lda * (int64_t)sizeof(uint16_t), sc = 32 * (int64_t)sizeof(float);
    int64_t m = 0;
    for (; m + 2 <= mtiles; m += 2) {
        float *c0 = acc + m * 16 * 32, *c1 = c0 + 16 * 32;
        const uint16_t *a0 = a + m * 16 * lda, *a1 = a0 + 16 * lda;
        if (first) {
            HF_T_ZERO(0);
            HF_T_ZERO(1);
            HF_T_ZERO(2);
            HF_T_ZERO(3);
        } else {
            HF_T_LOAD(0, c0, sc);
            HF_T_LOAD(1, c0 + 16, sc);
            HF_T_LOAD(2, c1, sc);
            HF_T_LOAD(3, c1 + 16, sc);
        }
        for (int s = 0; s < steps; s++) {
            HF_T_LOAD(4, a0 + s * 32, sa);
            HF_T_LOAD(5, a1 + s * 32, sa);
            HF_T_LOAD(6, bp + s * 1024, 64);
            HF_T_LOAD(7, bp + s * 1024 + 512, 64);
            HF_T_DP(0, 4, 6);
            HF_T_DP(1, 4, 7);
            HF_T_DP(2, 5, 6);
            HF_T_DP(3, 5, 7);
        }
        HF_T_STORE(0, c0, sc);
        HF_T_STORE(1, c0 + 16, sc);
        HF_T_STORE(2, c1, sc);
        HF_T_STORE(3, c1 + 16, sc);
    }
    if (m < mtiles) { /* an odd last token tile */
        float *c0 = acc + m * 16 * 32;
        const uint16_t *a0 = a + m * 16 * lda;
        if (first) {
            HF_T_ZERO(0);
            HF_T_ZERO(1);
        } else {
            HF_T_LOAD(0, c0, sc);
            HF_T_LOAD(1, c0 + 16, sc);
        }
        for (int s = 0; s < steps; s++) {
            HF_T_LOAD(4, a0 + s * 32, sa);
            HF_T_LOAD(6, bp + s * 1024, 64);
            HF_T_LOAD(7, bp + s * 1024 + 512, 64);
            HF_T_DP(0, 4, 6);
            HF_T_DP(1, 4, 7);
        }
        HF_T_STORE(0, c0, sc);
        HF_T_STORE(1, c0 + 16, sc);
    }
}

/* k block of an AMX job: its activation slice (mpad x kb bf16) about HF_X_BUDGET, so that it stays in L2
 * while every row block of weights is multiplied with it; the packed weights are 64 bytes per element of
 * kb. The pool's k_block option, where set, overrides (tests force several blocks with it). */
static int64_t amx_kblock(const lane_pool *p, int64_t mpad, int64_t kpad) {
    int64_t kb = p->k_block;
    if (kb <= 0) {
        kb = ((int64_t)HF_X_BUDGET / (mpad * 2)) & ~(int64_t)31;
        if (kb < 256) kb = 256;
        if (kb > 2048) kb = 2048;
    }
    return kb < kpad ? kb : kpad;
}

/* sums[mpad][32] = A . W^T over k in [0, kpad), W's rows given as two blocks of 16 (w0 with n0 rows, w1
 * with n1 rows; rows past those are zeros), each row `kvalid` long (zeros up to kpad), row stride ld */
static void amx_product(const uint16_t *a, int64_t lda, int64_t mpad, const uint16_t *w0, int n0,
                        const uint16_t *w1, int n1, int64_t ld, int64_t kvalid, int64_t kpad, int64_t kb,
                        uint16_t *bp, float *acc) {
    for (int64_t k0 = 0; k0 < kpad; k0 += kb) {
        const int steps = (int)((kpad - k0 < kb ? kpad - k0 : kb) / 32);
        for (int s = 0; s < steps; s++) {
            const int64_t k = k0 + 32 * (int64_t)s;
            pack_b(bp + s * 1024, n0 > 0 ? w0 + k : w0, ld, n0, kvalid - k);
            pack_b(bp + s * 1024 + 512, n1 > 0 ? w1 + k : w1, ld, n1, kvalid - k);
        }
        amx_gemm(a + k0, lda, mpad / 16, bp, steps, acc, k0 == 0);
    }
}

#else
static int amx_usable(void) { return 0; }
#endif

/* ------------------------------------------------------------------------------------------------------ */
/* Phase 1: h = silu(x . gate_j) * (x . up_j) for a range of rows of one job                             */

static void store_h(const lane_pool *p, const job_plan *pl, int64_t row, int64_t t, float g, float u) {
    float h;
    if (pl->rnd) {
        g = round_bf16(g);
        u = round_bf16(u);
        h = round_bf16(round_bf16(silu(g)) * u);
    } else {
        h = silu(g) * u;
    }
    int64_t at = pl->hoff + t * pl->rpad + row;
    p->hf[at] = h;
    if (pl->use_dp2) p->hb[at] = f32_to_bf16_bits(h); /* exact: h is already a bf16 value */
}

static void phase1_rows(const lane_pool *p, const job_plan *pl, int64_t r0, int64_t r1, float *scratch) {
    const hf_job *jb = pl->job;
    const size_t esz = p->dtype == 1 ? 2 : 4;
    const int kind = pl->use_dp1 ? 2 : (p->dtype == 1 ? 1 : 0);
    const void *rows[HF_ROWS_MAX];
    const void *xs[HF_TOK_GROUP];
    int nrows = 0;
    /* gate and up rows interleaved: a pass of 4 rows is two (gate, up) pairs */
    for (int64_t r = r0; r < r1; r++) {
        rows[nrows++] = (const char *)jb->gate + (size_t)(r * jb->ld_gate_up) * esz;
        rows[nrows++] = (const char *)jb->up + (size_t)(r * jb->ld_gate_up) * esz;
    }
    for (int64_t t0 = 0; t0 < jb->ntok; t0 += HF_TOK_GROUP) {
        const int ntx = (int)(jb->ntok - t0 < HF_TOK_GROUP ? jb->ntok - t0 : HF_TOK_GROUP);
        for (int t = 0; t < ntx; t++) {
            int64_t row = jb->tokens ? jb->tokens[t0 + t] : t0 + t;
            xs[t] = kind == 2 ? (const void *)((const uint16_t *)p->x + row * p->hidden)
                              : (const void *)(p->xf + row * p->hidden);
        }
        panel(p, rows, nrows, xs, ntx, p->hidden, kind, scratch);
        for (int64_t r = r0; r < r1; r++)
            for (int t = 0; t < ntx; t++) {
                const int i = (int)(2 * (r - r0));
                store_h(p, pl, r, t0 + t, scratch[i * ntx + t], scratch[(i + 1) * ntx + t]);
            }
    }
}

#if defined(HF_AMX)
/* Rows [r0, r1) (at most 16) of an AMX job, for all its tokens at once; the padding tokens' h comes out
 * zero (their activations are zeros), and the chunk with the last row also zeros h's padding columns
 * [r, rpad): phase 2 reads both as tile padding. */
static void phase1_amx(const lane_pool *p, const job_plan *pl, int64_t r0, int64_t r1, unsigned char *mine) {
    const hf_job *jb = pl->job;
    uint16_t *bp = (uint16_t *)mine;
    float *acc = (float *)(mine + p->amx_bp_bytes);
    const int nr = (int)(r1 - r0);
    const uint16_t *gate = (const uint16_t *)jb->gate + r0 * jb->ld_gate_up;
    const uint16_t *up = (const uint16_t *)jb->up + r0 * jb->ld_gate_up;
    amx_product(p->xp + pl->xoff, p->hpad, pl->mpad, gate, nr, up, nr, jb->ld_gate_up, p->hidden, p->hpad, pl->kb1,
                bp, acc);
    for (int64_t t = 0; t < pl->mpad; t++)
        for (int i = 0; i < nr; i++) store_h(p, pl, r0 + i, t, acc[t * 32 + i], acc[t * 32 + 16 + i]);
    if (r1 == jb->r)
        for (int64_t t = 0; t < pl->mpad; t++)
            for (int64_t c = r1; c < pl->rpad; c++) {
                p->hf[pl->hoff + t * pl->rpad + c] = 0.0f;
                p->hb[pl->hoff + t * pl->rpad + c] = 0;
            }
}
#endif

/* ------------------------------------------------------------------------------------------------------ */
/* Phase 2: out[token, c] += w_t * (h_t . down[c, 0:r]) for a range of hidden columns c, all jobs         */

static void finish_y(const lane_pool *p, const job_plan *pl, int64_t c, int64_t t, float y) {
    const hf_job *jb = pl->job;
    const int lose = pl->rnd && !jb->partial;
    if (lose) y = round_bf16(y);
    if (jb->weights) {
        const int64_t w = jb->weight_index ? jb->weight_index[t] : t;
        y *= jb->weight_dtype == 1 ? bf16_to_f32(((const uint16_t *)jb->weights)[w]) : ((const float *)jb->weights)[w];
        if (lose && jb->weight_bf16) y = round_bf16(y);
    }
    int64_t row = jb->tokens ? jb->tokens[t] : t;
    p->out[row * p->hidden + c] += y;
}

#if defined(HF_AMX)
/* Hidden columns [c0, c1) of an AMX job, 32 at a time, for all its tokens at once */
static void phase2_amx(const lane_pool *p, const job_plan *pl, int64_t c0, int64_t c1, unsigned char *mine) {
    const hf_job *jb = pl->job;
    uint16_t *bp = (uint16_t *)mine;
    float *acc = (float *)(mine + p->amx_bp_bytes);
    const uint16_t *down = (const uint16_t *)jb->down;
    for (int64_t n0 = c0; n0 < c1; n0 += 32) {
        const int nn = (int)(c1 - n0 < 32 ? c1 - n0 : 32), na = nn < 16 ? nn : 16, nb = nn - na;
        const uint16_t *w0 = down + n0 * jb->ld_down, *w1 = nb > 0 ? w0 + 16 * jb->ld_down : w0;
        amx_product(p->hb + pl->hoff, pl->rpad, pl->mpad, w0, na, w1, nb, jb->ld_down, jb->r, pl->rpad, pl->kb2, bp,
                    acc);
        for (int i = 0; i < nn; i++)
            for (int64_t t = 0; t < jb->ntok; t++) finish_y(p, pl, n0 + i, t, acc[t * 32 + i]);
    }
}
#endif

static void phase2_cols(const lane_pool *p, int64_t c0, int64_t c1, float *scratch, unsigned char *amx_mine) {
    const size_t esz = p->dtype == 1 ? 2 : 4;
    const void *rows[HF_ROWS_MAX];
    const void *hs[HF_TOK_GROUP];
    /* jobs in order, so every element of out receives its jobs' terms in the same order whatever the
     * thread count (results do not depend on the scheduling) */
    for (int j = 0; j < p->njobs; j++) {
        const job_plan *pl = &p->plans[j];
        const hf_job *jb = pl->job;
        if (jb->ntok == 0 || jb->r == 0) continue;
#if defined(HF_AMX)
        if (pl->amx) {
            phase2_amx(p, pl, c0, c1, amx_mine);
            continue;
        }
#else
        (void)amx_mine;
#endif
        const int kind = pl->use_dp2 ? 2 : (p->dtype == 1 ? 1 : 0);
        const int nrows = (int)(c1 - c0);
        for (int i = 0; i < nrows; i++) rows[i] = (const char *)jb->down + (size_t)((c0 + i) * jb->ld_down) * esz;
        for (int64_t t0 = 0; t0 < jb->ntok; t0 += HF_TOK_GROUP) {
            const int ntx = (int)(jb->ntok - t0 < HF_TOK_GROUP ? jb->ntok - t0 : HF_TOK_GROUP);
            for (int t = 0; t < ntx; t++) {
                int64_t at = pl->hoff + (t0 + t) * pl->rpad;
                hs[t] = kind == 2 ? (const void *)(p->hb + at) : (const void *)(p->hf + at);
            }
            panel(p, rows, nrows, hs, ntx, jb->r, kind, scratch);
            for (int i = 0; i < nrows; i++)
                for (int t = 0; t < ntx; t++) finish_y(p, pl, c0 + i, t0 + t, scratch[i * ntx + t]);
        }
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* One thread's share of a call                                                                           */

static void do_work(lane_pool *p, int tid) {
    float *scratch = p->scratch + (size_t)tid * HF_ROWS_MAX * HF_TOK_GROUP;
    unsigned char *amx_mine = NULL;
#if defined(HF_AMX)
    if (p->amx_jobs) {
        amx_mine = p->amx_buf + (size_t)tid * p->amx_stride;
        HF_T_LOADCFG(&hf_tiles_all16); /* the tile configuration is per thread */
    }
#endif
    /* phase 1: chunks of rows, taken in turn; all rows of a phase cost the same bytes (2 * hidden elements),
     * so equal row counts are equal work */
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(&p->next1, 1, memory_order_relaxed);
        if (c >= p->nchunks1) break;
        int j = 0;
        while (j + 1 < p->njobs && p->plans[j + 1].chunk0 <= c) j++;
        const job_plan *pl = &p->plans[j];
        int64_t r0 = (c - pl->chunk0) * pl->rows1;
        int64_t r1 = r0 + pl->rows1;
        if (r1 > pl->job->r) r1 = pl->job->r;
#if defined(HF_AMX)
        if (pl->amx) {
            phase1_amx(p, pl, r0, r1, amx_mine);
            continue;
        }
#endif
        phase1_rows(p, pl, r0, r1, scratch);
    }
    barrier_wait(p);
    if (tid == 0) p->t_barrier = now_us();
    /* phase 2: chunks of hidden columns; every column costs sum_j r_j elements of down */
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(&p->next2, 1, memory_order_relaxed);
        if (c >= p->nchunks2) break;
        int64_t c0 = c * p->cols_per_chunk2;
        int64_t c1 = c0 + p->cols_per_chunk2;
        if (c1 > p->hidden) c1 = p->hidden;
        phase2_cols(p, c0, c1, scratch, amx_mine);
    }
#if defined(HF_AMX)
    if (p->amx_jobs) HF_T_RELEASE(); /* a thread holding no tile state costs less at context switches */
#endif
}

/* Wake threads in a binary tree: thread k wakes 2k+1 and 2k+2, so the calling thread signals two condition
 * variables rather than one per worker (each signal of a sleeping thread is a system call). */
static void wake_children(lane_pool *p, int k) {
    for (int c = 2 * k + 1; c <= 2 * k + 2 && c < p->nactive; c++) {
        worker *w = &p->workers[c - 1];
        pthread_mutex_lock(&w->mu);
        atomic_fetch_add_explicit(&w->seq, 1, memory_order_relaxed);
        pthread_cond_signal(&w->cv);
        pthread_mutex_unlock(&w->mu);
    }
}

static void *worker_main(void *arg) {
    worker *w = (worker *)arg;
    lane_pool *p = w->pool;
    unsigned long seen = 0;
    for (;;) {
        int idle_spin = atomic_load_explicit(&p->idle_spin_us, memory_order_relaxed);
        if (idle_spin > 0) {
            /* optional short spin before sleeping (off by default) */
            double end = now_us() + idle_spin;
            while (atomic_load_explicit(&w->seq, memory_order_relaxed) == seen && now_us() < end)
                for (int i = 0; i < 64; i++) cpu_relax();
        }
        pthread_mutex_lock(&w->mu);
        while (atomic_load_explicit(&w->seq, memory_order_relaxed) == seen && !atomic_load(&p->stop))
            pthread_cond_wait(&w->cv, &w->mu);
        int stop = atomic_load(&p->stop);
        seen = atomic_load_explicit(&w->seq, memory_order_relaxed);
        pthread_mutex_unlock(&w->mu);
        if (stop) break;
        wake_children(p, w->index);
        do_work(p, w->index);
        if (atomic_fetch_sub_explicit(&p->remaining, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&p->done_mu);
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->done_mu);
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Public API                                                                                             */

int hf_lane_abi_version(void) { return HF_ABI_VERSION; }

/* sizeof(hf_job), for the caller to check its mirror of the struct */
int hf_lane_job_size(void) { return (int)sizeof(hf_job); }

/* 2 = AVX-512 with BF16 dot products, 1 = AVX-512F, 3 = AVX2 + FMA, 0 = plain C */
int hf_lane_isa(void) {
#if defined(HF_HAVE_DPBF16)
    return 2;
#elif defined(HF_ISA_AVX512)
    return 1;
#elif defined(HF_ISA_AVX2)
    return 3;
#else
    return 0;
#endif
}

/* 1 when the AMX path is compiled in and this process may use it (cpuid and Linux's permission; always 1
 * in an emulated build), else 0 */
int hf_lane_amx(void) { return amx_usable(); }

const char *hf_lane_strerror(int code) {
    switch (code) {
    case HF_OK: return "ok";
    case HF_ERR_POOL: return "no pool (closed or never created)";
    case HF_ERR_SHAPE: return "bad ntokens or hidden size";
    case HF_ERR_DTYPE: return "dtype must be 0 (fp32) or 1 (bf16)";
    case HF_ERR_JOB: return "bad job (null pointer, negative size, or stride smaller than the row)";
    case HF_ERR_TOKEN: return "a token index is out of range";
    case HF_ERR_NOMEM: return "out of memory";
    case HF_ERR_ACT: return "unsupported activation (only SiLU)";
    case HF_ERR_OPTION: return "unknown option or bad value";
    case HF_ERR_BUSY: return "a started call has not been waited for";
    case HF_ERR_IDLE: return "no call was started";
    case HF_PENDING: return "the call is still running";
    default: return "unknown error";
    }
}

void hf_lane_destroy(void *handle);

void *hf_lane_create(int threads) {
    if (threads < 1) threads = 1;
    if (threads > 1024) threads = 1024;
    lane_pool *p = (lane_pool *)calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->async_mu, NULL);
    pthread_cond_init(&p->async_cv, NULL);
    pthread_condattr_t mono;
    pthread_condattr_init(&mono);
    pthread_condattr_setclock(&mono, CLOCK_MONOTONIC);
    pthread_cond_init(&p->async_done_cv, &mono);
    pthread_condattr_destroy(&mono);
    p->nthreads = threads;
    p->barrier_spin_us = 50;
    atomic_init(&p->idle_spin_us, 0);
    atomic_init(&p->wait_spin_us, 0);
    /* Defaults measured on a 16-core Xeon with AVX-512 BF16 (two Mixtral experts, bf16, 16 threads):
     * prefetching 1024 bytes ahead in each weight row raised 1/2/4/8 tokens from 110/107/101/75 to
     * 121/117/113/80 GB/s (12 threads, 1 token: 91 -> 115 GB/s); VDPBF16PS gave no gain at 1-8 tokens
     * (116/110/100/75 GB/s without prefetch, and 118/114/98/74 with it) and a few per cent at 16-32,
     * so it is off unless asked for. */
    p->prefetch = 1024;
    p->short_row = 16384;
    p->dpbf16 = 0;
    p->min_bytes = 256 * 1024;
    p->amx_ok = amx_usable(); /* asks for the permission now, before any thread touches a tile */
    /* Measured on a 16-core Xeon with AMX-BF16 (two Mixtral experts, bf16, 16 threads): tiles against the
     * vector path 11.1/9.7/13.0/10.2 ms against 10.0/17.1/25.5/31.0 ms at 8/16/24/32 tokens per expert;
     * at 128 and 512 tokens 3.9 and 3.5 TFLOP/s against 0.7 (torch's per-expert F.linear: 2.5 and 2.9,
     * from the main thread of a benchmark). */
    p->amx_min_tokens = 16;
    pthread_mutex_init(&p->run_mu, NULL);
    pthread_mutex_init(&p->bar_mu, NULL);
    pthread_cond_init(&p->bar_cv, NULL);
    pthread_mutex_init(&p->done_mu, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    atomic_init(&p->bar_count, 0);
    atomic_init(&p->bar_gen, 0u);
    atomic_init(&p->remaining, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->next1, 0);
    atomic_init(&p->next2, 0);
    p->scratch = (float *)aligned_alloc(64, (size_t)threads * HF_ROWS_MAX * HF_TOK_GROUP * sizeof(float));
    if (!p->scratch) {
        hf_lane_destroy(p);
        return NULL;
    }
    if (threads > 1) {
        p->workers = (worker *)calloc((size_t)threads - 1, sizeof(worker));
        if (!p->workers) {
            hf_lane_destroy(p);
            return NULL;
        }
        /* workers block all signals: they belong to the thread that runs the interpreter */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        for (int i = 0; i < threads - 1; i++) {
            worker *w = &p->workers[i];
            pthread_mutex_init(&w->mu, NULL);
            pthread_cond_init(&w->cv, NULL);
            atomic_init(&w->seq, 0ul);
            w->pool = p;
            w->index = i + 1;
            if (pthread_create(&w->tid, NULL, worker_main, w) != 0) {
                pthread_mutex_destroy(&w->mu);
                pthread_cond_destroy(&w->cv);
                p->nthreads = i + 1; /* the workers started so far */
                break;
            }
            w->started = 1;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (p->nthreads != threads) {
            hf_lane_destroy(p);
            return NULL;
        }
    }
    return p;
}

void hf_lane_destroy(void *handle) {
    lane_pool *p = (lane_pool *)handle;
    if (!p) return;
    if (p->leader_started) {
        /* the leader makes a call it was asked for before it stops */
        pthread_mutex_lock(&p->async_mu);
        p->leader_stop = 1;
        pthread_cond_signal(&p->async_cv);
        pthread_mutex_unlock(&p->async_mu);
        pthread_join(p->leader, NULL);
    }
    pthread_mutex_destroy(&p->async_mu);
    pthread_cond_destroy(&p->async_cv);
    pthread_cond_destroy(&p->async_done_cv);
    pthread_mutex_lock(&p->run_mu); /* wait for a call in progress */
    if (p->workers) {
        atomic_store(&p->stop, 1);
        for (int i = 0; i < p->nthreads - 1; i++) {
            worker *w = &p->workers[i];
            if (!w->started) continue;
            pthread_mutex_lock(&w->mu); /* a worker checks stop holding its mutex: no lost wake-up */
            pthread_cond_signal(&w->cv);
            pthread_mutex_unlock(&w->mu);
        }
        for (int i = 0; i < p->nthreads - 1; i++) {
            worker *w = &p->workers[i];
            if (!w->started) continue;
            pthread_join(w->tid, NULL);
            pthread_mutex_destroy(&w->mu);
            pthread_cond_destroy(&w->cv);
        }
        free(p->workers);
    }
    pthread_mutex_unlock(&p->run_mu);
    free(p->plans);
    free(p->scratch);
    free(p->xf_buf);
    free(p->hf_buf);
    free(p->hb_buf);
    free(p->xp_buf);
    free(p->amx_buf);
    pthread_mutex_destroy(&p->run_mu);
    pthread_mutex_destroy(&p->bar_mu);
    pthread_cond_destroy(&p->bar_cv);
    pthread_mutex_destroy(&p->done_mu);
    pthread_cond_destroy(&p->done_cv);
    free(p);
}

int hf_lane_threads(void *handle) {
    lane_pool *p = (lane_pool *)handle;
    return p ? p->nthreads : 0;
}

/* The last call, as the calling thread saw it: out[0] = microseconds in all, out[1] = until the phase
 * barrier opened (phase 1), out[2] = after it (phase 2), out[3] = threads that took part, out[4] = weight
 * bytes read, out[5] = jobs computed on AMX tiles. Returns 0, or HF_ERR_POOL. */
int hf_lane_last_stats(void *handle, double *out) {
    lane_pool *p = (lane_pool *)handle;
    if (!p || !out) return HF_ERR_POOL;
    pthread_mutex_lock(&p->run_mu);
    out[0] = p->t_end - p->t_start;
    out[1] = p->t_barrier - p->t_start;
    out[2] = p->t_end - p->t_barrier;
    out[3] = p->nactive;
    out[4] = (double)p->last_bytes;
    out[5] = p->last_amx_jobs;
    pthread_mutex_unlock(&p->run_mu);
    return HF_OK;
}

int hf_lane_configure(void *handle, int option, int64_t value) {
    lane_pool *p = (lane_pool *)handle;
    if (!p) return HF_ERR_POOL;
    int rc = HF_OK;
    pthread_mutex_lock(&p->run_mu);
    switch (option) {
    case HF_OPT_BARRIER_SPIN_US:
        if (value < 0 || value > 1000000) rc = HF_ERR_OPTION;
        else p->barrier_spin_us = (int)value;
        break;
    case HF_OPT_PREFETCH:
        if (value < 0 || value > (1 << 20)) rc = HF_ERR_OPTION;
        else p->prefetch = value;
        break;
    case HF_OPT_DPBF16:
        if (value != 0 && value != 1) rc = HF_ERR_OPTION;
        else p->dpbf16 = (int)value;
        break;
    case HF_OPT_MIN_BYTES:
        if (value < 0) rc = HF_ERR_OPTION;
        else p->min_bytes = value;
        break;
    case HF_OPT_IDLE_SPIN_US:
        if (value < 0 || value > 1000000) rc = HF_ERR_OPTION;
        else atomic_store(&p->idle_spin_us, (int)value);
        break;
    case HF_OPT_K_BLOCK:
        if (value < 0 || value % 32 != 0) rc = HF_ERR_OPTION;
        else p->k_block = value;
        break;
    case HF_OPT_WAIT_SPIN_US:
        if (value < 0 || value > 1000000) rc = HF_ERR_OPTION;
        else atomic_store(&p->wait_spin_us, (int)value);
        break;
    case HF_OPT_SHORT_ROW:
        if (value < 0) rc = HF_ERR_OPTION;
        else p->short_row = value;
        break;
    case HF_OPT_AMX_MIN_TOKENS:
        if (value < 0) rc = HF_ERR_OPTION;
        else p->amx_min_tokens = value;
        break;
    default: rc = HF_ERR_OPTION;
    }
    pthread_mutex_unlock(&p->run_mu);
    return rc;
}

/* Buffers above this size are freed at the end of the call rather than kept (a long prefill must not pin
 * hundreds of MiB for the rest of the process). */
#define HF_KEEP_BYTES ((int64_t)64 << 20)

static void *grow(void *buf, int64_t *cap, int64_t need, size_t esz) {
    if (need <= *cap) return buf;
    free(buf);
    *cap = 0;
    size_t bytes = (size_t)need * esz;
    bytes = (bytes + 63) & ~(size_t)63;
    void *nb = aligned_alloc(64, bytes);
    if (nb) *cap = need;
    return nb;
}

static int validate(const hf_job *jobs, int njobs, int64_t ntokens, int64_t hidden) {
    for (int j = 0; j < njobs; j++) {
        const hf_job *jb = &jobs[j];
        if (jb->act != 0) return HF_ERR_ACT;
        if (jb->r < 0 || jb->ntok < 0 || (jb->weight_dtype != 0 && jb->weight_dtype != 1)) return HF_ERR_JOB;
        if (jb->r == 0 || jb->ntok == 0) continue;
        if (!jb->gate || !jb->up || !jb->down) return HF_ERR_JOB;
        if (jb->ld_gate_up < hidden || jb->ld_down < jb->r) return HF_ERR_JOB;
        if (!jb->tokens) {
            if (jb->ntok != ntokens) return HF_ERR_JOB;
        } else {
            for (int64_t t = 0; t < jb->ntok; t++)
                if (jb->tokens[t] < 0 || jb->tokens[t] >= ntokens) return HF_ERR_TOKEN;
        }
        if (jb->weight_index) {
            if (!jb->weights) return HF_ERR_JOB;
            for (int64_t t = 0; t < jb->ntok; t++)
                if (jb->weight_index[t] < 0 || jb->weight_index[t] >= jb->nweights) return HF_ERR_TOKEN;
        }
    }
    return HF_OK;
}

int hf_lane_run(void *handle, const hf_job *jobs, int njobs, const void *x, int64_t ntokens, int64_t hidden,
                int dtype, float *out) {
    lane_pool *p = (lane_pool *)handle;
    if (!p) return HF_ERR_POOL;
    if (dtype != 0 && dtype != 1) return HF_ERR_DTYPE;
    if (ntokens < 0 || hidden <= 0 || njobs < 0) return HF_ERR_SHAPE;
    if (njobs > 0 && !jobs) return HF_ERR_JOB;
    if (ntokens == 0 || njobs == 0) return HF_OK;
    if (!x || !out) return HF_ERR_SHAPE;
    int rc = validate(jobs, njobs, ntokens, hidden);
    if (rc) return rc;

    pthread_mutex_lock(&p->run_mu);
    const size_t esz = dtype == 1 ? 2 : 4;
    if (njobs > p->plans_cap) {
        free(p->plans);
        p->plans_cap = 0;
        p->plans = (job_plan *)malloc((size_t)njobs * sizeof(job_plan));
        if (!p->plans) {
            pthread_mutex_unlock(&p->run_mu);
            return HF_ERR_NOMEM;
        }
        p->plans_cap = njobs;
    }
#if defined(HF_HAVE_DPBF16)
    const int dp = p->dpbf16 && dtype == 1;
#else
    const int dp = 0;
#endif

    /* (gate, up) row pairs per phase-1 chunk: about HF_CHUNK_BYTES, even (passes of two pairs), at most
     * HF_ROWS_MAX / 2. Chunks of two threads may share a 64-byte line of h: each value is written once
     * after reading 2 * hidden weights, so that sharing costs nothing measurable. */
    int64_t row_bytes = 2 * hidden * (int64_t)esz;
    int64_t rows1 = (HF_CHUNK_BYTES / row_bytes) & ~(int64_t)1;
    if (rows1 < 2) rows1 = 2;
    if (rows1 > HF_ROWS_MAX / 2) rows1 = HF_ROWS_MAX / 2;

    int64_t hneed = 0, nchunks1 = 0, sum_r = 0, bytes = 0, xneed = 0, kb_most = 0, m_most = 0;
    int need_xf = 0, need_hb = 0, amx_jobs = 0;
    const int64_t hpad = (hidden + 31) & ~(int64_t)31;
    for (int j = 0; j < njobs; j++) {
        const hf_job *jb = &jobs[j];
        job_plan *pl = &p->plans[j];
        int live = jb->r > 0 && jb->ntok > 0;
        pl->job = jb;
        pl->rnd = dtype == 1 && jb->round_bf16;
        /* AMX for bf16 jobs rounded as torch rounds (h is then exactly bf16, the tiles' input type) */
        pl->amx = live && p->amx_ok && pl->rnd && p->amx_min_tokens > 0 && jb->ntok >= p->amx_min_tokens;
        pl->rpad = pl->amx ? (jb->r + 31) & ~(int64_t)31 : (jb->r + 15) & ~(int64_t)15;
        pl->mpad = pl->amx ? (jb->ntok + 15) & ~(int64_t)15 : jb->ntok;
        pl->rows1 = pl->amx ? 16 : rows1;
        pl->hoff = hneed;
        pl->chunk0 = nchunks1;
        pl->nchunks = live ? (jb->r + pl->rows1 - 1) / pl->rows1 : 0;
        pl->use_dp1 = dp && !pl->amx;
        pl->use_dp2 = (dp && pl->rnd) || pl->amx;
        pl->xoff = xneed;
        pl->kb1 = pl->kb2 = 0;
        if (live) {
            hneed += pl->mpad * pl->rpad;
            sum_r += jb->r;
            bytes += jb->r * (2 * hidden + hidden) * (int64_t)esz;
            need_xf |= dtype == 1 && !pl->use_dp1 && !pl->amx;
            need_hb |= pl->use_dp2;
        }
#if defined(HF_AMX)
        if (pl->amx) {
            amx_jobs++;
            xneed += pl->mpad * hpad;
            pl->kb1 = amx_kblock(p, pl->mpad, hpad);
            pl->kb2 = amx_kblock(p, pl->mpad, pl->rpad);
            kb_most = pl->kb1 > kb_most ? pl->kb1 : kb_most;
            kb_most = pl->kb2 > kb_most ? pl->kb2 : kb_most;
            m_most = pl->mpad > m_most ? pl->mpad : m_most;
        }
#endif
        nchunks1 += pl->nchunks;
    }
    if (nchunks1 == 0) {
        pthread_mutex_unlock(&p->run_mu);
        return HF_OK;
    }

    /* fp32 copy of the activations for the widen-and-FMA path: converted once here, not per weight row */
    if (need_xf) {
        p->xf_buf = (float *)grow(p->xf_buf, &p->xf_cap, ntokens * hidden, sizeof(float));
        if (!p->xf_buf) {
            pthread_mutex_unlock(&p->run_mu);
            return HF_ERR_NOMEM;
        }
        const uint16_t *xb = (const uint16_t *)x;
        for (int64_t i = 0; i < ntokens * hidden; i++) p->xf_buf[i] = bf16_to_f32(xb[i]);
        p->xf = p->xf_buf;
    } else {
        p->xf = (const float *)x; /* fp32 dtype; unused on the VDPBF16PS path */
    }
    p->hf_buf = (float *)grow(p->hf_buf, &p->hf_cap, hneed, sizeof(float));
    if (need_hb) p->hb_buf = (uint16_t *)grow(p->hb_buf, &p->hb_cap, hneed, sizeof(uint16_t));
    if (!p->hf_buf || (need_hb && !p->hb_buf)) {
        pthread_mutex_unlock(&p->run_mu);
        return HF_ERR_NOMEM;
    }
    if (amx_jobs) {
        /* per thread: the packed weights of a k block (two B tiles of 1 KiB per 32 elements), then the fp32
         * sums of all the job's tokens for 32 weight rows */
        p->amx_bp_bytes = (size_t)(kb_most / 32) * 2048;
        p->amx_stride = (p->amx_bp_bytes + (size_t)m_most * 32 * sizeof(float) + 63) & ~(size_t)63;
        p->amx_buf = (unsigned char *)grow(p->amx_buf, &p->amx_cap, (int64_t)p->amx_stride * p->nthreads, 1);
        p->xp_buf = (uint16_t *)grow(p->xp_buf, &p->xp_cap, xneed, sizeof(uint16_t));
        if (!p->amx_buf || !p->xp_buf) {
            pthread_mutex_unlock(&p->run_mu);
            return HF_ERR_NOMEM;
        }
        /* each AMX job's tokens gathered into a contiguous panel of whole tiles, zero padded */
        const uint16_t *xb = (const uint16_t *)x;
        for (int j = 0; j < njobs; j++) {
            const job_plan *pl = &p->plans[j];
            if (!pl->amx) continue;
            for (int64_t t = 0; t < pl->mpad; t++) {
                uint16_t *dst = p->xp_buf + pl->xoff + t * hpad;
                int64_t filled = 0;
                if (t < pl->job->ntok) {
                    const int64_t row = pl->job->tokens ? pl->job->tokens[t] : t;
                    memcpy(dst, xb + row * hidden, (size_t)hidden * sizeof(uint16_t));
                    filled = hidden;
                }
                memset(dst + filled, 0, (size_t)(hpad - filled) * sizeof(uint16_t));
            }
        }
    }

    /* hidden columns per phase-2 chunk: about HF_CHUNK_BYTES of down weights (all jobs), a multiple of 4
     * (passes of four rows), at most HF_ROWS_MAX */
    int64_t col_bytes = sum_r * (int64_t)esz;
    int64_t cols2 = (HF_CHUNK_BYTES / (col_bytes > 0 ? col_bytes : 1)) & ~(int64_t)3;
    if (cols2 < 4) cols2 = 4;
    if (cols2 > HF_ROWS_MAX) cols2 = HF_ROWS_MAX;
    if (amx_jobs) cols2 = (cols2 + 31) & ~(int64_t)31; /* whole pairs of B tiles */
    if (cols2 > hidden) cols2 = hidden;

    p->jobs = jobs;
    p->njobs = njobs;
    p->dtype = dtype;
    p->ntokens = ntokens;
    p->hidden = hidden;
    p->x = x;
    p->out = out;
    p->hf = p->hf_buf;
    p->hb = p->hb_buf;
    p->rows_per_chunk1 = rows1;
    p->amx_jobs = amx_jobs;
    p->hpad = hpad;
    p->xp = p->xp_buf;
    p->nchunks1 = nchunks1;
    p->cols_per_chunk2 = cols2;
    p->nchunks2 = (hidden + cols2 - 1) / cols2;
    atomic_store_explicit(&p->next1, 0, memory_order_relaxed);
    atomic_store_explicit(&p->next2, 0, memory_order_relaxed);

    /* threads: enough that each reads at least min_bytes of weights (waking a sleeping thread costs a few
     * microseconds), and no more than there are chunks */
    int64_t want = p->min_bytes > 0 ? bytes / p->min_bytes : p->nthreads;
    if (want < 1) want = 1;
    if (want > p->nthreads) want = p->nthreads;
    if (want > nchunks1 && want > p->nchunks2) want = nchunks1 > p->nchunks2 ? nchunks1 : p->nchunks2;
    p->nactive = (int)want;
    atomic_store_explicit(&p->remaining, p->nactive - 1, memory_order_relaxed);
    atomic_store_explicit(&p->bar_count, 0, memory_order_relaxed);

    p->last_bytes = bytes;
    p->last_amx_jobs = amx_jobs;
    p->t_start = now_us();
    wake_children(p, 0);
    do_work(p, 0);
    if (p->nactive > 1 && !spin_while_nonzero(&p->remaining, p->barrier_spin_us)) {
        pthread_mutex_lock(&p->done_mu);
        while (atomic_load_explicit(&p->remaining, memory_order_acquire) != 0)
            pthread_cond_wait(&p->done_cv, &p->done_mu);
        pthread_mutex_unlock(&p->done_mu);
    }

    p->t_end = now_us();
    if (p->hf_cap > HF_KEEP_BYTES / (int64_t)sizeof(float)) {
        free(p->hf_buf);
        p->hf_buf = NULL;
        p->hf_cap = 0;
    }
    if (p->hb_cap > HF_KEEP_BYTES / (int64_t)sizeof(uint16_t)) {
        free(p->hb_buf);
        p->hb_buf = NULL;
        p->hb_cap = 0;
    }
    if (p->xp_cap > HF_KEEP_BYTES / (int64_t)sizeof(uint16_t)) {
        free(p->xp_buf);
        p->xp_buf = NULL;
        p->xp_cap = 0;
    }
    if (p->amx_cap > HF_KEEP_BYTES) {
        free(p->amx_buf);
        p->amx_buf = NULL;
        p->amx_cap = 0;
    }
    if (p->xf_cap > HF_KEEP_BYTES / (int64_t)sizeof(float)) {
        free(p->xf_buf);
        p->xf_buf = NULL;
        p->xf_cap = 0;
    }
    p->jobs = NULL;
    p->x = NULL;
    p->out = NULL;
    pthread_mutex_unlock(&p->run_mu);
    return HF_OK;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Asynchronous calls                                                                                     */

/* spin up to `us` microseconds while *state != value (read without the lock; the writers store it with
 * release order under the lock) */
static void spin_while_state_not(const int *state, int value, int us) {
    double end = now_us() + us;
    while (__atomic_load_n(state, __ATOMIC_ACQUIRE) != value && now_us() < end)
        for (int i = 0; i < 64; i++) cpu_relax();
}

static void *leader_main(void *arg) {
    lane_pool *p = (lane_pool *)arg;
    pthread_mutex_lock(&p->async_mu);
    for (;;) {
        int spun = 0;
        while (p->async_state != 1 && !p->leader_stop) {
            int spin = atomic_load_explicit(&p->idle_spin_us, memory_order_relaxed);
            if (spin > 0 && !spun) {
                /* the next layer step's call usually comes within a millisecond or two: catching it spinning
                 * saves the wake-up of a sleeping thread */
                spun = 1;
                pthread_mutex_unlock(&p->async_mu);
                spin_while_state_not(&p->async_state, 1, spin);
                pthread_mutex_lock(&p->async_mu);
                continue;
            }
            pthread_cond_wait(&p->async_cv, &p->async_mu);
        }
        if (p->async_state != 1) break; /* asked to stop, nothing requested */
        __atomic_store_n(&p->async_state, 2, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&p->async_mu);
        double t0 = now_us();
        if (p->a_zero && p->a_out && p->a_ntokens > 0 && p->a_hidden > 0)
            memset(p->a_out, 0, (size_t)(p->a_ntokens * p->a_hidden) * sizeof(float));
        int rc = hf_lane_run(p, p->a_jobs, p->a_njobs, p->a_x, p->a_ntokens, p->a_hidden, p->a_dtype, p->a_out);
        double t1 = now_us();
        pthread_mutex_lock(&p->async_mu);
        p->async_rc = rc;
        p->a_t_start = t0;
        p->a_t_end = t1;
        __atomic_store_n(&p->async_state, 3, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&p->async_done_cv);
    }
    pthread_mutex_unlock(&p->async_mu);
    return NULL;
}

/* Start hf_lane_run's call on the pool's leader thread and return at once (zero_out: out is zeroed first,
 * by the leader). Every pointer must stay valid until hf_lane_wait has returned the call's result. One call
 * at a time: HF_ERR_BUSY while a started call has not been collected. */
int hf_lane_start(void *handle, const hf_job *jobs, int njobs, const void *x, int64_t ntokens, int64_t hidden,
                  int dtype, float *out, int zero_out) {
    lane_pool *p = (lane_pool *)handle;
    if (!p) return HF_ERR_POOL;
    pthread_mutex_lock(&p->async_mu);
    if (p->async_state != 0) {
        pthread_mutex_unlock(&p->async_mu);
        return HF_ERR_BUSY;
    }
    if (!p->leader_started) {
        /* the leader blocks all signals, as the workers do: they belong to the interpreter's thread */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        int failed = pthread_create(&p->leader, NULL, leader_main, p);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (failed) {
            pthread_mutex_unlock(&p->async_mu);
            return HF_ERR_NOMEM;
        }
        p->leader_started = 1;
    }
    p->a_jobs = jobs;
    p->a_njobs = njobs;
    p->a_x = x;
    p->a_ntokens = ntokens;
    p->a_hidden = hidden;
    p->a_dtype = dtype;
    p->a_out = out;
    p->a_zero = zero_out;
    __atomic_store_n(&p->async_state, 1, __ATOMIC_RELEASE);
    pthread_cond_signal(&p->async_cv);
    pthread_mutex_unlock(&p->async_mu);
    return HF_OK;
}

/* Wait up to timeout_us (< 0: without limit) for the started call. Returns HF_PENDING if it is still
 * running, HF_ERR_IDLE if none was started, else the call's own return code, and then times[0..1] = the
 * leader's monotonic clock (microseconds) at the call's start and end; the call is then collected. */
int hf_lane_wait(void *handle, int64_t timeout_us, double *times) {
    lane_pool *p = (lane_pool *)handle;
    if (!p) return HF_ERR_POOL;
    pthread_mutex_lock(&p->async_mu);
    if (p->async_state == 0) {
        pthread_mutex_unlock(&p->async_mu);
        return HF_ERR_IDLE;
    }
    int spin = atomic_load_explicit(&p->wait_spin_us, memory_order_relaxed);
    if (spin > 0 && p->async_state != 3) {
        /* the result is wanted at once: spinning saves the wake-up of a sleeping thread */
        if (timeout_us >= 0 && spin > timeout_us) spin = (int)timeout_us;
        pthread_mutex_unlock(&p->async_mu);
        spin_while_state_not(&p->async_state, 3, spin);
        pthread_mutex_lock(&p->async_mu);
    }
    if (timeout_us < 0) {
        while (p->async_state != 3) pthread_cond_wait(&p->async_done_cv, &p->async_mu);
    } else if (p->async_state != 3) {
        struct timespec deadline;
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_sec += timeout_us / 1000000;
        deadline.tv_nsec += (long)(timeout_us % 1000000) * 1000;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec += 1;
            deadline.tv_nsec -= 1000000000L;
        }
        while (p->async_state != 3)
            if (pthread_cond_timedwait(&p->async_done_cv, &p->async_mu, &deadline) != 0) break;
    }
    if (p->async_state != 3) {
        pthread_mutex_unlock(&p->async_mu);
        return HF_PENDING;
    }
    int rc = p->async_rc;
    if (times) {
        times[0] = p->a_t_start;
        times[1] = p->a_t_end;
    }
    __atomic_store_n(&p->async_state, 0, __ATOMIC_RELEASE); /* read unlocked by the spinners */
    pthread_mutex_unlock(&p->async_mu);
    return rc;
}
