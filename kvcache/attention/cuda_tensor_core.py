"""The CUDA attention kernel's tensor-core form (half-precision pools, head_dim
64 or 128, up to 16 query heads a KV head): the same contract as the scalar
kernel in cuda.py (store every packed token's K/V in place, attend over its
block table in place, padding gets zeros, store-only rows), with the two
products of attention done by `mma.sync.m16n8k16` instead of lane-by-lane
dot products and shuffles.

Two launches a layer: STORE_SOURCE writes the step's K/V into the pools
first, so the attention (SOURCE) reads every key from the pools, rotated,
with no branch for keys of the step's own chunk and no rotation in its
loop. A first version rotated those keys inside the loop, as the scalar
kernel does: the 8B x 256 run fell to 9,539 out tok/s, against 14,165 with
the store split out (bench/results/h200_s8_tensor_cores_v1.log and
h200_s8_tensor_cores.log). A step of decode rows only (STORE_OWN) is one
launch: a block's first warp stores its row's K/V, and a barrier comes
before any key is read; 8B x 256 16,185 against 15,281 out tok/s with the
store launch kept (bench/results/h200_s11_attention_ab.log).

Why tensor cores: the scalar kernel spends ~150 instructions a lane on each
key (16 lanes a key: 4 heads x 8 multiply-adds for the score, 4 shuffle-reductions
a head, the exponentials, 4 x 8 multiply-adds into the accumulator), about
4x what the key's bytes take to read on an H200; the matrix units do the
multiply-adds and the reductions of a 16-key tile in 32 instructions a lane.

A warp serves a run of up to 16 / G consecutive rows of one chunk
(`row_runs` in cuda.py: a decode row alone, a prompt chunk in runs) and one
KV head: the run's query heads fill the 16 rows of the mma (operand row m is
head m % G of the run's token m / G), so a prompt chunk reads each key once
for 16 / G of its tokens, each row masked to its own token's keys. The warps
of a thread block either share one run and split its keys, merging their
partial softmaxes through shared memory (decode rows: few runs, long
contexts), or each take a run of a prompt chunk and walk all its keys alone
("solo", `warp_runs`): a chunk's many runs fill the GPU by themselves, and the
merge was most of the cost of a run's few keys.

Layout (one warp walks 16 keys at a time; g = lane / 4, t = lane % 4; a
chunk is 16 bytes of a row, 8 dims):
- Scores S [rows x keys] = Q K^T, an m16n8k16 per 16 dims and 8 keys: A is
  Q (this lane's rows g and g + 8), B is K^T (column n = key n of the
  tile). A dot product may visit the dims in any order, so lane (g, t)
  holds chunks 4v + t (v < D/32) of its rows, and mma j takes the lane's
  dims 4j + {0, 1} as k-slots 2t, 2t + 1 and + {2, 3} as k-slots 2t + 8,
  2t + 9; Q uses the same order. The 4 lanes of a key read 64 contiguous
  bytes a load (whole 32-byte sectors), and every pair RoPE rotates (j and
  j + D/2, or 2p and 2p + 1) sits in one lane. Each lane's contiguous
  quarter of the row (the first layout) used half of each sector a load:
  one 8B layer's 64 fresh 128-token chunks took 313-458 us against 230
  now (bench/results/h200_s11_attention_ab.log).
- The result (C) gives lane (g, t) the scores of rows g and g + 8 for keys
  2t, 2t + 1 of the tile: two tiles (16 keys) are exactly the A operand of
  O += P V (rows = heads, k-slots = keys), so P never leaves registers.
- V is the B operand: lane (g, t) reads chunks 8v + g (v < D/64) of the
  value rows of keys 2t, 2t + 1, 2t + 8, 2t + 9 (the 8 lanes of a row read
  128 contiguous bytes) and pairs same-dim halves of two rows with a byte
  permute; mma nb takes the lane's dim nb, so its column n is dim
  (8 (nb / 8) + n) 8 + nb % 8, and the accumulator of lane (g, t) holds,
  for rows g and g + 8, the chunks 8v + 2t and 8v + 2t + 1 whole.
Scores are scaled and capped in float32 after the product; P is rounded to
the pools' type for the second product (as fused attention kernels do), the
softmax sums are kept in float32. Warps sharing a run take alternate 16-key
tiles; a solo warp takes every tile of its own.
"""

from kvcache.attention import cuda_rope

HEADER = cuda_rope.HEADER + """
template <int BF16>
__device__ inline void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                unsigned b1) {
    if (BF16)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Word e of a run of 16-byte loads: with e known at compile time (the loops
// that call it are unrolled) this names a register; a pointer into the array
// would put the array in local memory.
template <int N>
__device__ __forceinline__ unsigned word(const uint4 (&v)[N], int e) {
    const uint4& x = v[e >> 2];
    return (e & 3) == 0 ? x.x : (e & 3) == 1 ? x.y : (e & 3) == 2 ? x.z : x.w;
}

// Two floats as one register of two halves (lo in the low 16 bits).
template <int BF16>
__device__ inline unsigned pack2(float lo, float hi) {
    if (BF16) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&v);
    }
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// The two halves of a register as floats (the inverse of pack2).
template <int BF16>
__device__ inline float2 unpack2(unsigned w) {
    if (BF16) return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
"""

# One warp stores packed token i's K/V for KV head kvh at position pos into
# its slot, in place (cuda.py says why that is sound), the key rotated first;
# D/32 dims a lane.
_STORE_TOKEN = """
    {
    constexpr int SP = D / 32;
    const int* table = block_tables
        + (size_t)(table_row < 0 ? ~table_row : table_row) * block_tables_shape[1];
    const int d0 = lane * SP;
    const size_t row = ((size_t)(table[pos / BS] * BS + pos % BS) * KVH + kvh) * D + d0;
    const size_t k_at = (size_t)i * K_STRIDE + K_OFF + (size_t)kvh * D + d0;
    const size_t v_at = (size_t)i * V_STRIDE + V_OFF + (size_t)kvh * D + d0;
    float kx[SP];
    for (int e = 0; e < SP; ++e) kx[e] = static_cast<float>(k_new[k_at + e]);
    if (ROTATE) rotate_span<SP, TRAD, D>(kx, rope_cos, rope_sin, i, d0, 16, 0xffffffffu);
    T* k_out = (T*)k_pool;
    T* v_out = (T*)v_pool;
    for (int e = 0; e < SP; ++e) {
        k_out[row + e] = static_cast<T>(kx[e]);
        v_out[row + e] = v_new[v_at + e];
    }
    }
"""

# Launched before SOURCE on a step with prompt rows: every packed token's K/V
# into its slot, a thread block (one warp) a (token, KV head). Its
# one-element output is an input of SOURCE's launch, which orders the two.
# (A step of decode rows only stores inside SOURCE: STORE_OWN.)
STORE_SOURCE = """
    const int i = blockIdx.x / KVH;
    const int kvh = blockIdx.x % KVH;
    const int lane = threadIdx.x;
    if (blockIdx.x == 0 && lane == 0) stored[0] = 1;
    const int pos = positions[i];
    if (pos < 0) return;  // padding
    const int table_row = table_of[i];
""" + _STORE_TOKEN

SOURCE = """
    constexpr int PL = D / 4;   // dims of a q or k row a lane holds (score operands)
    constexpr int QK = D / 16;  // score mmas a tile of 8 keys
    constexpr int PV = D / 8;   // value mmas (8 output dims each) a 16-key step
    constexpr int KVEC = D / 32;  // 16-byte chunks (8 dims) a lane holds of a q or k row
    constexpr int VVEC = D / 64;  // ... of a v row
    static_assert(Q_STRIDE % 8 == 0 && Q_OFF % 8 == 0, "q rows are read in 16-byte chunks");
    const unsigned FULL = 0xffffffffu;
    const int kvh = blockIdx.x % KVH;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    // `groups` names a run a warp (`warp_runs` in cuda.py): the warps of a
    // block that name one run split its keys and merge; warps naming runs of
    // their own (SOLO, a prompt chunk's runs) walk all their keys alone.
    const int* block_runs = groups + (size_t)(blockIdx.x / KVH) * NWARPS;
    const bool solo = NWARPS > 1 && block_runs[0] != block_runs[1];
    const int run = block_runs[warp];
    if (run < 0) return;        // an idle warp of a block of solo runs
    const int i0 = run >> 5;    // the run's first packed row
    const int rows = run & 31;  // its rows: consecutive tokens of one chunk
    const int g = lane >> 2, tq = lane & 3;
    const int pos0 = positions[i0];
    if (pos0 < 0) {  // padding (a run of one row): zeros
        const size_t at = ((size_t)i0 * KVH + kvh) * G * D;
        for (int j = threadIdx.x; j < G * D; j += blockDim.x) out[at + j] = T(0);
        return;
    }
    const float scale = __int_as_float(SCALE_BITS);
    const float softcap = __int_as_float(CAP_BITS);
    const int W = block_tables_shape[1];
    const int window = WINDOW;
    const int table_row = table_of[i0];
    if (table_row < 0) return;  // store only (dense_prefill.py): never in a run; for safety
    const int* table = block_tables + (size_t)table_row * W;
    if (STORE_OWN) {
        // A step of decode rows only: a block's run is one row, the only
        // reader of its new slot, so its first warp stores the row's K/V and
        // the barrier (which makes those writes visible to the block) comes
        // before any key is read; no store launch.
        if (warp == 0) {
            const int i = i0, pos = pos0;
""" + _STORE_TOKEN + """
        }
        __syncthreads();
    }
    const int ctx = pos0 + rows;  // keys up to the run's last position
    const int first_t = window > 0 && pos0 + 1 > window ? pos0 + 1 - window : 0;
    const int q_stride = Q_STRIDE, q_off = Q_OFF;
    const bool hi = rows * G > 8;  // operand rows g + 8 hold queries (uniform in the block)

    // Operand row m (0..15) is query head m % G of the run's token m / G;
    // this lane's rows are g and g + 8, chunks 4v + tq of each (Q as A).
    int row_pos[2];  // the position of each of those rows' token, -1: none
    unsigned qa[2][PL / 2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int mrow = g + 8 * r;
        const int tk = mrow / G, h = mrow % G;
        const bool real = tk < rows;
        row_pos[r] = real ? pos0 + tk : -1;
        const int qi = i0 + (real ? tk : 0);
        const uint4* src = reinterpret_cast<const uint4*>(
            q + (size_t)qi * q_stride + q_off + (size_t)(kvh * G + h) * D);
        float x[PL];
#pragma unroll
        for (int v = 0; v < KVEC; ++v) {
            const uint4 c = real ? src[4 * v + tq] : make_uint4(0, 0, 0, 0);
            const unsigned w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 f = unpack2<BF16>(w[k]);
                x[8 * v + 2 * k] = f.x;
                x[8 * v + 2 * k + 1] = f.y;
            }
        }
        if (ROTATE && (r == 0 || hi)) rotate_chunks<KVEC, TRAD, D>(x, rope_cos, rope_sin, qi, tq);
#pragma unroll
        for (int e = 0; e < PL / 2; ++e) qa[r][e] = pack2<BF16>(x[2 * e], x[2 * e + 1]);
    }

    float top_of[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    float acc[PV][4];
#pragma unroll
    for (int nb = 0; nb < PV; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nb][e] = 0.f;
    }

    // One step's math on its loads: scores, the online softmax, O += P V.
    auto step = [&](int base, const uint4 (&kv4)[2][KVEC], const uint4 (&vv4)[4][VVEC]) {
        // Scores: s[tile] = rows g (0, 1) and g + 8 (2, 3) x keys 2t, 2t + 1,
        // each row masked to its own token's keys (and window).
        float s[2][4];
#pragma unroll
        for (int tile = 0; tile < 2; ++tile) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[tile][e] = 0.f;
#pragma unroll
            for (int j = 0; j < QK; ++j) {
                const unsigned a[4] = {qa[0][2 * j], qa[1][2 * j], qa[0][2 * j + 1],
                                       qa[1][2 * j + 1]};
                mma16816<BF16>(s[tile], a, word(kv4[tile], 2 * j), word(kv4[tile], 2 * j + 1));
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[tile][e] * scale;
                if (softcap > 0.f) x = softcap * tanhf(x / softcap);
                const int key = base + 8 * tile + 2 * tq + (e & 1), at = row_pos[e >> 1];
                const bool seen = key <= at && (window == 0 || key > at - window);
                s[tile][e] = seen ? x : -INFINITY;
            }
        }
        // Online softmax a row; a row's 16 keys sit in its 4 lanes.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (r == 1 && !hi) continue;
            float top = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]),
                              fmaxf(s[1][2 * r], s[1][2 * r + 1]));
            top = fmaxf(top, __shfl_xor_sync(FULL, top, 1));
            top = fmaxf(top, __shfl_xor_sync(FULL, top, 2));
            const float m_new = fmaxf(top_of[r], top);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;
            const float corr = __expf(top_of[r] - m_use);
            top_of[r] = m_new;
            l[r] *= corr;
#pragma unroll
            for (int tile = 0; tile < 2; ++tile) {
#pragma unroll
                for (int e = 2 * r; e < 2 * r + 2; ++e) {
                    s[tile][e] = __expf(s[tile][e] - m_use);
                    l[r] += s[tile][e];
                }
            }
#pragma unroll
            for (int nb = 0; nb < PV; ++nb) {
                acc[nb][2 * r] *= corr;
                acc[nb][2 * r + 1] *= corr;
            }
        }
        if (!hi) {
#pragma unroll
            for (int tile = 0; tile < 2; ++tile) s[tile][2] = s[tile][3] = 0.f;
        }
        // O += P V: P straight from the score registers.
        const unsigned pa[4] = {pack2<BF16>(s[0][0], s[0][1]), pack2<BF16>(s[0][2], s[0][3]),
                                pack2<BF16>(s[1][0], s[1][1]), pack2<BF16>(s[1][2], s[1][3])};
#pragma unroll
        for (int nb = 0; nb < PV; ++nb) {
            const unsigned sel = nb & 1 ? 0x7632u : 0x5410u;
            const unsigned b0 = __byte_perm(word(vv4[0], nb / 2), word(vv4[1], nb / 2), sel);
            const unsigned b1 = __byte_perm(word(vv4[2], nb / 2), word(vv4[3], nb / 2), sel);
            mma16816<BF16>(acc[nb], pa, b0, b1);
        }
    };
    // One step's loads: keys base..base+15 (K as two 8-key tiles, V as the
    // rows this lane pairs). Keys past the context read the last key (finite)
    // and are masked. This step's own keys are in the pools already
    // (STORE_SOURCE ran).
    auto load = [&](int base, uint4 (&kv4)[2][KVEC], uint4 (&vv4)[4][VVEC]) {
#pragma unroll
        for (int tile = 0; tile < 2; ++tile) {
            const int kk = min(base + 8 * tile + g, ctx - 1);
            const uint4* src = reinterpret_cast<const uint4*>(
                k_pool + ((size_t)(table[kk / BS] * BS + kk % BS) * KVH + kvh) * D);
#pragma unroll
            for (int v = 0; v < KVEC; ++v) kv4[tile][v] = src[4 * v + tq];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int kk = min(base + 2 * tq + (r & 1) + 8 * (r >> 1), ctx - 1);
            const uint4* src = reinterpret_cast<const uint4*>(
                v_pool + ((size_t)(table[kk / BS] * BS + kk % BS) * KVH + kvh) * D);
#pragma unroll
            for (int v = 0; v < VVEC; ++v) vv4[r][v] = src[8 * v + g];
        }
    };
    // PIPE: the next step's loads are issued before this step's math, so a
    // warp has two steps of K/V in flight and its math hides under the
    // latency (the math of a tensor-core step is short; each step otherwise
    // waits out a table lookup and a K/V read in series). Prefetching the
    // step after next into L2 instead (no registers held) was slower:
    // bench/results/h200_s9_pipeline.log.
    uint4 kv4[2][KVEC], vv4[4][VVEC];
    const int stride = solo ? 16 : NWARPS * 16;  // a solo warp takes every tile
    int base = first_t + (solo ? 0 : warp * 16);
    if (PIPE && base < ctx) load(base, kv4, vv4);
    for (; base < ctx; base += stride) {
        if (PIPE) {
            uint4 nk[2][KVEC], nv[4][VVEC];
            const int next = base + stride;
            if (next < ctx) load(next, nk, nv);
            step(base, kv4, vv4);
#pragma unroll
            for (int tile = 0; tile < 2; ++tile)
#pragma unroll
                for (int v = 0; v < KVEC; ++v) kv4[tile][v] = nk[tile][v];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int v = 0; v < VVEC; ++v) vv4[r][v] = nv[r][v];
        } else {
            load(base, kv4, vv4);  // every load of the step first, then the math
            step(base, kv4, vv4);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(FULL, l[r], 1);
        l[r] += __shfl_xor_sync(FULL, l[r], 2);
    }
    if (solo) {  // this warp saw every key of its rows: normalise and write
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int mrow = g + 8 * r;
            if (row_pos[r] < 0) continue;
            const float inv = 1.f / l[r];
            const size_t at = ((size_t)(i0 + mrow / G) * KVH + kvh) * G + mrow % G;
            // Chunks 8s + 2t + half: acc[8s .. 8s + 7][2r + half], a 16-byte store each.
            uint4* dst = reinterpret_cast<uint4*>(out + at * D);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int e = 2 * r + half;  // the accumulator slot of these dims
                auto two = [&](int nb) {     // the dims of mmas nb, nb + 1, packed
                    return pack2<BF16>(acc[nb][e] * inv, acc[nb + 1][e] * inv);
                };
#pragma unroll
                for (int c = 0; c < VVEC; ++c)
                    dst[8 * c + 2 * tq + half] =
                        make_uint4(two(8 * c), two(8 * c + 2), two(8 * c + 4), two(8 * c + 6));
            }
        }
        return;
    }
    // The warps' partial softmaxes, merged through shared memory. Dim d of
    // a row sits at d + d / 32 and rows RS (= 2 mod 32) apart, so a store
    // instruction's 32 lanes (8 rows x 4 chunk pairs) hit 32 banks.
    constexpr int RS = D + D / 32 + ((2 - (D + D / 32)) & 31);
    __shared__ float sm_m[NWARPS][16];
    __shared__ float sm_l[NWARPS][16];
    __shared__ float sm_acc[NWARPS][16 * RS];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int mrow = g + 8 * r;
        if (row_pos[r] < 0) continue;
        if (tq == 0) { sm_m[warp][mrow] = top_of[r]; sm_l[warp][mrow] = l[r]; }
#pragma unroll
        for (int nb = 0; nb < PV; ++nb) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int d = (8 * (nb / 8) + 2 * tq + half) * 8 + nb % 8;
                sm_acc[warp][mrow * RS + d + d / 32] = acc[nb][2 * r + half];
            }
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < rows * G * D; j += blockDim.x) {
        const int mrow = j / D, d = j % D;  // mrow = token * G + head
        float top = -INFINITY;
        for (int w = 0; w < NWARPS; ++w) top = fmaxf(top, sm_m[w][mrow]);
        float num = 0.f, den = 0.f;
        for (int w = 0; w < NWARPS; ++w) {
            const float wt = sm_l[w][mrow] > 0.f ? __expf(sm_m[w][mrow] - top) : 0.f;
            num += sm_acc[w][mrow * RS + d + d / 32] * wt;
            den += sm_l[w][mrow] * wt;
        }
        const size_t at = ((size_t)(i0 + mrow / G) * KVH + kvh) * G + mrow % G;
        out[at * D + d] = static_cast<T>(num / den);
    }
"""
