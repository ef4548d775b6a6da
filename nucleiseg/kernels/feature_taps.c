/* A perceptual-loss tap of VGG16 in one pass each way, for channels-last (NHWC) float32 tensors:
 *
 *   forward:  r = max(a, 0);  diff = r - t;  sum of diff^2;  pooled, argmax = 2x2 max-pool of r (stride 2)
 *   backward: grad_a = (a > 0) * (scale * diff + [argmax here] * grad_pooled)
 *
 * which torch computes with ~9 passes over the feature map (ReLU, subtraction, square, sum, max-pool and
 * their backward passes, the zero-filled pooling gradient and the sum of the two gradients). Max-pool ties
 * go to the first position in row-major order, as in torch; the argmax is stored as 0-3 in one byte.
 * Rows and columns left over by an odd size count in the distance and get no pooling gradient (floor mode).
 * Parallel over rows with OpenMP; the sum adds per-row partial sums in a fixed order (deterministic).
 * Channel counts must be multiples of 8.
 */
#include <stddef.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int i8 __attribute__((vector_size(32), aligned(4)));

static inline v8 relu(v8 x) {
    const v8 zero = {0};
    return (v8)((i8)x & (x > zero));
}

static inline float lanes_sum(v8 x) {
    return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

/* Returns the sum of diff^2. pooled and argmax are (N, H/2, W/2, C), or NULL for no pooling; row_sums has
 * N * H entries of scratch. */
double tap_forward(const float *restrict a, const float *restrict t, float *restrict diff, float *restrict pooled,
                   unsigned char *restrict argmax, double *restrict row_sums, long n, long h, long w, long c) {
    const long ph = h / 2, pw = w / 2;
#pragma omp parallel for schedule(static)
    for (long row = 0; row < n * h; row++) {
        const long image = row / h, y = row % h;
        const long base = row * w * c;
        v8 acc = {0};
        for (long x = 0; x < w; x++) {
            for (long g = 0; g < c; g += 8) {
                const long i = base + x * c + g;
                const v8 d = relu(*(const v8 *)(a + i)) - *(const v8 *)(t + i);
                *(v8 *)(diff + i) = d;
                acc += d * d;
            }
        }
        row_sums[row] = lanes_sum(acc);
        if (pooled == NULL || y % 2 || y / 2 >= ph) continue; /* pool once per pair of rows, from its top */
        const long out_base = ((image * ph + y / 2) * pw) * c;
        for (long px = 0; px < pw; px++) {
            for (long g = 0; g < c; g += 8) {
                const long i = base + 2 * px * c + g, o = out_base + px * c + g;
                const v8 r[4] = {relu(*(const v8 *)(a + i)), relu(*(const v8 *)(a + i + c)),
                                 relu(*(const v8 *)(a + i + w * c)), relu(*(const v8 *)(a + i + w * c + c))};
                for (int k = 0; k < 8; k++) {
                    float best = r[0][k];
                    unsigned char at = 0;
                    for (unsigned char q = 1; q < 4; q++) {
                        if (r[q][k] > best) {
                            best = r[q][k];
                            at = q;
                        }
                    }
                    pooled[o + k] = best;
                    argmax[o + k] = at;
                }
            }
        }
    }
    double total = 0.0;
    for (long row = 0; row < n * h; row++) total += row_sums[row];
    return total;
}

/* grad_a from the distance's gradient (scale * diff) and the pooled output's gradient (may be NULL). */
void tap_backward(const float *restrict a, const float *restrict diff, const float *restrict grad_pooled,
                  const unsigned char *restrict argmax, float scale, float *restrict grad_a, long n, long h, long w,
                  long c) {
    const long ph = h / 2, pw = w / 2;
    const v8 zero = {0};
#pragma omp parallel for schedule(static)
    for (long row = 0; row < n * h; row++) {
        const long image = row / h, y = row % h;
        const long base = row * w * c;
        const int pooled_row = grad_pooled != NULL && y / 2 < ph;
        const long out_base = ((image * ph + y / 2) * pw) * c;
        for (long x = 0; x < w; x++) {
            const int pooled_here = pooled_row && x / 2 < pw;
            const unsigned char position = (unsigned char)(2 * (y % 2) + x % 2);
            for (long g = 0; g < c; g += 8) {
                const long i = base + x * c + g;
                v8 grad = scale * *(const v8 *)(diff + i);
                if (pooled_here) {
                    const long o = out_base + (x / 2) * c + g;
                    const v8 gp = *(const v8 *)(grad_pooled + o);
                    v8 hit;
                    for (int k = 0; k < 8; k++) hit[k] = argmax[o + k] == position ? gp[k] : 0.0f;
                    grad += hit;
                }
                const v8 av = *(const v8 *)(a + i);
                *(v8 *)(grad_a + i) = (v8)((i8)grad & (av > zero));
            }
        }
    }
}
