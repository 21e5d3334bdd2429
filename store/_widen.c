/* Rows of a 16-bit float matrix gathered and widened to float32 in one pass (store/widen.py).
 *
 * The loader's CPU batches are float32 gathered from float16 (or bfloat16) group buffers. numpy
 * gathers but converts float16 without SIMD, and torch converts fast but cannot gather into
 * another dtype, so the Python path is a gather into scratch and a conversion pass over it. Here
 * each row is read once and written once: float16 through the F16C instructions (x86-64, checked
 * at run time), bfloat16 by a shift. The GIL is released for the loop; one call runs on the
 * calling thread alone (the loader runs one per builder thread).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_F16C_PATH 1

__attribute__((target("avx,f16c"))) static void widen_f16_rows(
    const uint16_t *source, const int64_t *rows, Py_ssize_t n, Py_ssize_t d, float *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint16_t *row = source + rows[i] * d;
        float *dst = out + i * d;
        if (i + 1 < n)
            __builtin_prefetch(source + rows[i + 1] * d);
        Py_ssize_t j = 0;
        for (; j + 8 <= d; j += 8)
            _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + j))));
        for (; j < d; j++)
            dst[j] = _cvtsh_ss(row[j]);
    }
}

static int cpu_converts_f16(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
}
#else
#define HAVE_F16C_PATH 0
static int cpu_converts_f16(void) { return 0; }
#endif

static void widen_bf16_rows(const uint16_t *source, const int64_t *rows, Py_ssize_t n, Py_ssize_t d, float *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint16_t *row = source + rows[i] * d;
        uint32_t *dst = (uint32_t *)(out + i * d);
        for (Py_ssize_t j = 0; j < d; j++)
            dst[j] = (uint32_t)row[j] << 16;  /* bfloat16 is the top half of a float32 */
    }
}

static int has_format(const Py_buffer *view, const char *formats)
{
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    return f[0] != '\0' && f[1] == '\0' && strchr(formats, f[0]) != NULL;
}

static PyObject *take_widen(PyObject *self, PyObject *args)
{
    PyObject *source_obj, *rows_obj, *out_obj;
    int bfloat16;
    if (!PyArg_ParseTuple(args, "OOOp", &source_obj, &rows_obj, &out_obj, &bfloat16))
        return NULL;
    if (!bfloat16 && !cpu_converts_f16()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no F16C instructions: use the Python gather");
        return NULL;
    }
    Py_buffer source, rows, out;
    const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT;
    if (PyObject_GetBuffer(source_obj, &source, flags) < 0)
        return NULL;
    if (PyObject_GetBuffer(rows_obj, &rows, flags) < 0) {
        PyBuffer_Release(&source);
        return NULL;
    }
    if (PyObject_GetBuffer(out_obj, &out, flags | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&source);
        PyBuffer_Release(&rows);
        return NULL;
    }
    PyObject *result = NULL;
    if (source.ndim != 2 || source.itemsize != 2 || !has_format(&source, bfloat16 ? "Hh" : "e")) {
        PyErr_SetString(PyExc_TypeError, "source must be a C-contiguous 2-D array of float16 (or bfloat16 bits as uint16)");
    } else if (rows.ndim != 1 || rows.itemsize != 8 || !has_format(&rows, "qlQL")) {
        PyErr_SetString(PyExc_TypeError, "rows must be a contiguous 1-D int64 array");
    } else if (out.ndim != 2 || out.itemsize != 4 || !has_format(&out, "f")
               || out.shape[0] != rows.shape[0] || out.shape[1] != source.shape[1]) {
        PyErr_SetString(PyExc_TypeError, "out must be a C-contiguous float32 array of shape (len(rows), source columns)");
    } else {
        const int64_t *index = (const int64_t *)rows.buf;
        const Py_ssize_t n = rows.shape[0], d = source.shape[1], limit = source.shape[0];
        Py_ssize_t bad = -1;
        for (Py_ssize_t i = 0; i < n && bad < 0; i++)
            if (index[i] < 0 || index[i] >= limit)
                bad = i;
        if (bad >= 0) {
            PyErr_Format(PyExc_IndexError, "row %lld is out of range for a source of %zd rows", (long long)index[bad], limit);
        } else {
            Py_BEGIN_ALLOW_THREADS
            if (bfloat16)
                widen_bf16_rows((const uint16_t *)source.buf, index, n, d, (float *)out.buf);
#if HAVE_F16C_PATH
            else
                widen_f16_rows((const uint16_t *)source.buf, index, n, d, (float *)out.buf);
#endif
            Py_END_ALLOW_THREADS
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&source);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *converts_f16(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(cpu_converts_f16());
}

static PyMethodDef methods[] = {
    {"take_widen", take_widen, METH_VARARGS,
     "take_widen(source, rows, out, bfloat16): out[i] = float32(source[rows[i]]), rows checked in range."},
    {"converts_f16", converts_f16, METH_NOARGS, "Whether this CPU widens float16 here (F16C)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_widen", NULL, -1, methods};

PyMODINIT_FUNC PyInit__widen(void)
{
    return PyModule_Create(&module);
}
