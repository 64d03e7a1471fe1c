/* Fused products of one giant step over NTT-form CKKS ciphertexts (veilface.crypto.packed).
 *
 * A bin's score for giant step a is sum_b bin[a*g1 + b] x probe[b]: g1 ciphertext-ciphertext
 * products of two-component ciphertexts, each a coefficient-wise (dyadic) product in NTT form:
 *   out0 = sum x0*y0,  out1 = sum x0*y1 + x1*y0,  out2 = sum x1*y1   (mod q).
 * SEAL reduces after every product and every addition; here each output coefficient
 * accumulates its 64x64 -> 128-bit products unreduced and is reduced once. Coefficients are
 * below q < 2^61, so a product is below 2^122 and out1's 2*g1 terms stay below 2^128 for
 * g1 <= 32 (checked). The result is bit-identical to SEAL's multiply + add_inplace
 * (tests/crypto/test_packed.py). One data prime only: the caller checks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef unsigned __int128 u128;

#define BLOCK 256
#define MAX_TERMS 32

static PyObject *giant(PyObject *self, PyObject *args) {
    Py_buffer bin, probe, out;
    Py_ssize_t first, count, n;
    unsigned long long q;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*nnnKw*", &bin, &probe, &first, &count, &n, &q, &out))
        return NULL;
    PyObject *ret = NULL;
    if (n <= 0 || count <= 0 || count > MAX_TERMS || first < 0 || q < 2 || (q >> 61) != 0) {
        PyErr_SetString(PyExc_ValueError, "giant: bad sizes or modulus");
        goto done;
    }
    if (bin.len < (first + count) * 2 * n * 8 || probe.len < count * 2 * n * 8 ||
        out.len < 3 * n * 8) {
        PyErr_SetString(PyExc_ValueError, "giant: a buffer is smaller than its shape");
        goto done;
    }
    {
        const uint64_t *B = (const uint64_t *)bin.buf + first * 2 * n;
        const uint64_t *P = (const uint64_t *)probe.buf;
        uint64_t *O = (uint64_t *)out.buf;
        const uint64_t mod = (uint64_t)q;
        Py_BEGIN_ALLOW_THREADS
        u128 a0[BLOCK], a1[BLOCK], a2[BLOCK];
        for (Py_ssize_t i0 = 0; i0 < n; i0 += BLOCK) {
            Py_ssize_t m = n - i0 < BLOCK ? n - i0 : BLOCK;
            memset(a0, 0, sizeof a0);
            memset(a1, 0, sizeof a1);
            memset(a2, 0, sizeof a2);
            for (Py_ssize_t b = 0; b < count; b++) {
                const uint64_t *x0 = B + b * 2 * n + i0, *x1 = x0 + n;
                const uint64_t *y0 = P + b * 2 * n + i0, *y1 = y0 + n;
                for (Py_ssize_t i = 0; i < m; i++) {
                    a0[i] += (u128)x0[i] * y0[i];
                    a1[i] += (u128)x0[i] * y1[i] + (u128)x1[i] * y0[i];
                    a2[i] += (u128)x1[i] * y1[i];
                }
            }
            for (Py_ssize_t i = 0; i < m; i++) {
                O[i0 + i] = (uint64_t)(a0[i] % mod);
                O[n + i0 + i] = (uint64_t)(a1[i] % mod);
                O[2 * n + i0 + i] = (uint64_t)(a2[i] % mod);
            }
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&bin);
    PyBuffer_Release(&probe);
    PyBuffer_Release(&out);
    return ret;
}

/* -- SEAL's seeded ciphertexts: the uniform half from its seed -------------------------------
 *
 * A seeded ciphertext is saved as c0 and a 64-byte seed; SEAL's load expands c1 from the seed
 * with its default PRNG, Blake2xbPRNG: a stream of blake2xb(outlen = 4096, in = counter (u64,
 * little-endian, from 0), key = seed) blocks, read 8 bytes per coefficient, each rejected while
 * >= max_multiple = (2^64 - 1) - ((2^64 - 1) mod q) - 1 (a fresh 8 bytes from the stream each
 * time), then reduced mod q (SEAL's sample_poly_uniform; the coefficients are in NTT form as
 * drawn). BLAKE2b is RFC 7693's; BLAKE2X's parameter blocks are the BLAKE2X specification's.
 * Tested bit for bit against SEAL's own expansion (tests/crypto/test_packed.py). */

static const uint64_t B2_IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

static const uint8_t B2_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static inline uint64_t rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian host (x86-64, aarch64) */
    return v;
}

#define B2_G(a, b, c, d, x, y)          \
    do {                                \
        a = a + b + (x);                \
        d = rotr64(d ^ a, 32);          \
        c = c + d;                      \
        b = rotr64(b ^ c, 24);          \
        a = a + b + (y);                \
        d = rotr64(d ^ a, 16);          \
        c = c + d;                      \
        b = rotr64(b ^ c, 63);          \
    } while (0)

/* One compression of a 128-byte block; t: bytes hashed so far including this block. */
static void b2_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = B2_IV[i];
    }
    v[12] ^= t;
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = B2_SIGMA[r];
        B2_G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        B2_G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        B2_G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        B2_G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        B2_G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        B2_G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        B2_G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        B2_G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* h = IV xor the parameter block's first 8 words (salt and personalization are zero here). */
static void b2_init(uint64_t h[8], uint8_t digest_length, uint8_t key_length, uint8_t fanout,
                    uint8_t depth, uint32_t leaf_length, uint32_t node_offset, uint32_t xof_length,
                    uint8_t node_depth, uint8_t inner_length) {
    uint8_t p[64] = {0};
    p[0] = digest_length;
    p[1] = key_length;
    p[2] = fanout;
    p[3] = depth;
    memcpy(p + 4, &leaf_length, 4);
    memcpy(p + 8, &node_offset, 4);
    memcpy(p + 12, &xof_length, 4);
    p[16] = node_depth;
    p[17] = inner_length;
    for (int i = 0; i < 8; i++) h[i] = B2_IV[i] ^ load64(p + 8 * i);
}

#define XOF_BYTES 4096

/* blake2xb(out, 4096, in = counter, key = seed) as SEAL's Blake2xbPRNG::refill_buffer calls it. */
static void blake2xb_block(uint8_t out[XOF_BYTES], uint64_t counter, const uint8_t seed[64]) {
    uint64_t h[8];
    uint8_t block[128];
    /* root: keyed BLAKE2b-512 of the counter (the key block, then the 8 input bytes) */
    b2_init(h, 64, 64, 1, 1, 0, 0, XOF_BYTES, 0, 0);
    memset(block, 0, sizeof block);
    memcpy(block, seed, 64);
    b2_compress(h, block, 128, 0);
    memset(block, 0, sizeof block);
    memcpy(block, &counter, 8);
    b2_compress(h, block, 136, 1);
    uint8_t root[64];
    memcpy(root, h, 64);
    /* output block i: BLAKE2b-512 of the root with node offset i */
    for (uint32_t i = 0; i < XOF_BYTES / 64; i++) {
        b2_init(h, 64, 0, 0, 0, 64, i, XOF_BYTES, 0, 64);
        memset(block, 0, sizeof block);
        memcpy(block, root, 64);
        b2_compress(h, block, 64, 1);
        memcpy(out + 64 * i, h, 64);
    }
}

typedef struct {
    const uint8_t *seed;
    uint64_t counter;
    size_t head;
    uint8_t buf[XOF_BYTES];
} b2_prng;

/* The next 8 bytes of the stream: always whole words, as 4096 is a multiple of 8. */
static uint64_t prng_u64(b2_prng *g) {
    if (g->head == XOF_BYTES) {
        blake2xb_block(g->buf, g->counter++, g->seed);
        g->head = 0;
    }
    uint64_t v = load64(g->buf + g->head);
    g->head += 8;
    return v;
}

/* expand_seed(seed, n, q, out): out[n] = SEAL's c1 of a seeded ciphertext (one prime q). */
static PyObject *expand_seed(PyObject *self, PyObject *args) {
    Py_buffer seed, out;
    Py_ssize_t n;
    unsigned long long q;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nKw*", &seed, &n, &q, &out)) return NULL;
    PyObject *ret = NULL;
    if (seed.len != 64 || n <= 0 || q < 2 || out.len < n * 8) {
        PyErr_SetString(PyExc_ValueError, "expand_seed: a 64-byte seed and room for n words");
        goto done;
    }
    {
        uint64_t *o = (uint64_t *)out.buf;
        const uint64_t mod = (uint64_t)q;
        const uint64_t max_random = 0xFFFFFFFFFFFFFFFFULL;
        const uint64_t max_multiple = max_random - (max_random % mod) - 1;
        b2_prng *g = PyMem_RawMalloc(sizeof(b2_prng));
        if (g == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        g->seed = (const uint8_t *)seed.buf;
        g->counter = 0;
        g->head = XOF_BYTES;
        for (Py_ssize_t i = 0; i < n; i++) o[i] = prng_u64(g); /* the first n words, in one read */
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t r = o[i];
            while (r >= max_multiple) r = prng_u64(g);
            o[i] = r % mod;
        }
        Py_END_ALLOW_THREADS
        PyMem_RawFree(g);
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&seed);
    PyBuffer_Release(&out);
    return ret;
}

static PyMethodDef methods[] = {
    {"giant", giant, METH_VARARGS,
     "giant(bin, probe, first, count, n, q, out): out[3][n] = sum_b bin[first+b] x probe[b] mod q"},
    {"expand_seed", expand_seed, METH_VARARGS,
     "expand_seed(seed, n, q, out): the uniform half of a seeded SEAL ciphertext, as SEAL expands it"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_products", NULL, -1, methods};

PyMODINIT_FUNC PyInit__products(void) { return PyModule_Create(&module); }
