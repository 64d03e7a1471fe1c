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

static PyMethodDef methods[] = {
    {"giant", giant, METH_VARARGS,
     "giant(bin, probe, first, count, n, q, out): out[3][n] = sum_b bin[first+b] x probe[b] mod q"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_products", NULL, -1, methods};

PyMODINIT_FUNC PyInit__products(void) { return PyModule_Create(&module); }
