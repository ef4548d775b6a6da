/* Tile transforms of Winograd's F(4x4, 3x3) and F(6x6, 3x3) for channels-last (NHWC) float32 tensors.
 *
 * The matrix products between them run in torch (torch.bmm); these loops do the memory-bound parts in one
 * pass each, which torch's elementwise ops need about ten passes for. They are parallelised with OpenMP:
 * loaded into a process that has torch, they share torch's OpenMP thread pool (the same libgomp.so.1), so
 * its idle workers do not spin against them.
 *
 * F(m x m, 3x3) maps n x n input tiles (n = m + 2, overlapping by 2) to m x m output tiles. Layouts: x (N, H,
 * W, C) and y (N, H, W, K) channels-last; v (tiles, n*n, C) tile-major (each tile's Winograd-domain rows
 * contiguous: n*n planes a large power-of-two stride apart alias in the caches); m (n*n, tiles, K), the
 * output of the n*n matrix products. Tile row r of a chunk is row r % th of image r / th. Channel counts
 * must be multiples of 8 (one AVX vector; other targets split the vector type themselves).
 */
#include <stddef.h>

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* 8 floats; unaligned access allowed */
typedef int i8 __attribute__((vector_size(32), aligned(4)));

static inline v8 keep_if_positive(v8 value, v8 key) { /* value where key > 0, else 0 */
    const v8 zero = {0};
    return (v8)((i8)value & (key > zero));
}

/* F(4, 3), interpolation points 0, ±1, ±2, ∞: B^T d along one axis */
static inline void input4_1d(const v8 d[6], v8 out[6]) {
    const v8 a = d[4] - 4.0f * d[2], b = d[3] - 4.0f * d[1], c = d[4] - d[2], e = d[3] - d[1];
    out[0] = (d[4] - 5.0f * d[2]) + 4.0f * d[0];
    out[1] = a + b;
    out[2] = a - b;
    out[3] = c + 2.0f * e;
    out[4] = c - 2.0f * e;
    out[5] = (d[5] - 5.0f * d[3]) + 4.0f * d[1];
}

/* F(4, 3): A^T m along one axis */
static inline void output4_1d(const v8 m[6], v8 out[4]) {
    const v8 s12 = m[1] + m[2], s34 = m[3] + m[4], d12 = m[1] - m[2], d34 = m[3] - m[4];
    out[0] = m[0] + s12 + s34;
    out[1] = d12 + 2.0f * d34;
    out[2] = s12 + 4.0f * s34;
    out[3] = d12 + 8.0f * d34 + m[5];
}

/* F(6, 3), interpolation points 0, ±1, ±2, ±1/2, ∞: B^T d along one axis */
static inline void input6_1d(const v8 d[8], v8 out[8]) {
    out[0] = (d[0] - d[6]) + 5.25f * (d[4] - d[2]);
    out[7] = (d[7] - d[1]) + 5.25f * (d[3] - d[5]);
    v8 a = (d[2] + d[6]) - 4.25f * d[4], b = (d[1] + d[5]) - 4.25f * d[3];
    out[1] = a + b;
    out[2] = a - b;
    a = (0.25f * d[2] + d[6]) - 1.25f * d[4];
    b = (0.5f * d[1] - 2.5f * d[3]) + 2.0f * d[5];
    out[3] = a + b;
    out[4] = a - b;
    a = d[6] + 4.0f * (d[2] - 1.25f * d[4]);
    b = (2.0f * d[1] - 2.5f * d[3]) + 0.5f * d[5];
    out[5] = a + b;
    out[6] = a - b;
}

/* F(6, 3): A^T m along one axis */
static inline void output6_1d(const v8 m[8], v8 out[6]) {
    const v8 a1 = m[1] + m[2], s1 = m[1] - m[2], a2 = m[3] + m[4], s2 = m[3] - m[4];
    const v8 a3 = m[5] + m[6], s3 = m[5] - m[6];
    out[0] = m[0] + a1 + a2 + a3;
    out[1] = s1 + 2.0f * s2 + 0.5f * s3;
    out[2] = a1 + 4.0f * a2 + 0.25f * a3;
    out[3] = s1 + 8.0f * s2 + 0.125f * s3;
    out[4] = a1 + 16.0f * a2 + 0.0625f * a3;
    out[5] = s1 + 32.0f * s2 + 0.03125f * s3 + m[7];
}

/* winograd<M>_input: v = B^T d B for every n x n input tile d of tile rows [r0, r1) of x, zero outside x
 * (the convolution's padding of 1). With a mask (shaped like x), x counts as zero wherever the mask is not
 * positive: the backward pass of a ReLU fused into the previous layer.
 *
 * winograd<M>_output: y = A^T m A + bias for the tiles of tile rows [r0, r1) (then max(y, 0) when relu),
 * cropped to y. */
#define WINOGRAD_TRANSFORMS(M, N, INPUT_1D, OUTPUT_1D)                                                         \
    void winograd##M##_input(const float *restrict x, const float *restrict mask, float *restrict v, long h,  \
                             long w, long c, long r0, long r1) {                                               \
        const long th = (h + M - 1) / M, tw = (w + M - 1) / M, tiles = (r1 - r0) * tw;                         \
        const v8 zero = {0};                                                                                   \
        _Pragma("omp parallel for schedule(static)") for (long t = 0; t < tiles; t++) {                        \
            const long r = r0 + t / tw, tx = t % tw, image = r / th, ty = r % th;                              \
            const long y0 = M * ty - 1, x0 = M * tx - 1;                                                       \
            float *out = v + t * N * N * c;                                                                    \
            for (long g = 0; g < c; g += 8) {                                                                  \
                v8 d[N][N], s[N][N]; /* d[col][row] */                                                         \
                for (int a = 0; a < N; a++) {                                                                  \
                    const long yy = y0 + a;                                                                    \
                    for (int b = 0; b < N; b++) {                                                              \
                        const long xx = x0 + b;                                                                \
                        if (yy < 0 || yy >= h || xx < 0 || xx >= w) {                                          \
                            d[b][a] = zero;                                                                    \
                            continue;                                                                          \
                        }                                                                                      \
                        const long offset = ((image * h + yy) * w + xx) * c + g;                               \
                        const v8 value = *(const v8 *)(x + offset);                                            \
                        d[b][a] = mask ? keep_if_positive(value, *(const v8 *)(mask + offset)) : value;        \
                    }                                                                                          \
                }                                                                                              \
                for (int b = 0; b < N; b++) INPUT_1D(d[b], s[b]); /* along each column */                      \
                for (int a = 0; a < N; a++) {                     /* along each row */                         \
                    v8 row[N], out_row[N];                                                                     \
                    for (int b = 0; b < N; b++) row[b] = s[b][a];                                              \
                    INPUT_1D(row, out_row);                                                                    \
                    for (int b = 0; b < N; b++) *(v8 *)(out + (a * N + b) * c + g) = out_row[b];               \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
                                                                                                               \
    void winograd##M##_output(const float *restrict m, const float *restrict bias, int relu, float *restrict y, \
                              long h, long w, long k, long r0, long r1) {                                      \
        const long th = (h + M - 1) / M, tw = (w + M - 1) / M, tiles = (r1 - r0) * tw;                         \
        _Pragma("omp parallel for schedule(static)") for (long t = 0; t < tiles; t++) {                        \
            const long r = r0 + t / tw, tx = t % tw, image = r / th, ty = r % th;                              \
            const int rows = h - M * ty < M ? (int)(h - M * ty) : M;                                           \
            const int cols = w - M * tx < M ? (int)(w - M * tx) : M;                                           \
            for (long g = 0; g < k; g += 8) {                                                                  \
                v8 p[N][M]; /* p[col][row] */                                                                  \
                for (int b = 0; b < N; b++) {                                                                  \
                    v8 column[N];                                                                              \
                    for (int a = 0; a < N; a++)                                                                \
                        column[a] = *(const v8 *)(m + ((a * N + b) * tiles + t) * k + g);                      \
                    OUTPUT_1D(column, p[b]);                                                                   \
                }                                                                                              \
                const v8 bias_g = *(const v8 *)(bias + g);                                                     \
                for (int a = 0; a < rows; a++) {                                                               \
                    v8 row[N], q[M];                                                                           \
                    for (int b = 0; b < N; b++) row[b] = p[b][a];                                              \
                    OUTPUT_1D(row, q);                                                                         \
                    for (int b = 0; b < cols; b++) {                                                           \
                        const v8 value = q[b] + bias_g;                                                        \
                        *(v8 *)(y + ((image * h + M * ty + a) * w + M * tx + b) * k + g) =                     \
                            relu ? keep_if_positive(value, value) : value;                                     \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

WINOGRAD_TRANSFORMS(4, 6, input4_1d, output4_1d)
WINOGRAD_TRANSFORMS(6, 8, input6_1d, output6_1d)
