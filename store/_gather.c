/* Rows gathered from one or several row-major matrices in one pass, copied or widened to float32
 * (store/gather.py).
 *
 * out[i] = sources[which[i]][rows[i]] (which absent: every row from sources[0]), in one of three
 * modes: a copy (the stored dtype), float16 -> float32 through the F16C instructions (x86-64,
 * checked at run time), bfloat16 -> float32 by a shift. numpy gathers but converts float16
 * without SIMD and takes one source per call; torch converts fast but cannot gather into another
 * dtype. Here each row is read once and written once, from a group buffer or straight from the
 * kept chunk maps of a shuffle group (store/producer.py). Every index is checked before anything
 * is written. The GIL is released for the loop; one call runs on the calling thread alone (the
 * loader runs one per builder thread).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { MODE_COPY = 0, MODE_WIDEN_F16 = 1, MODE_WIDEN_BF16 = 2 };

typedef struct {
    const char *const *base; /* each source's first byte */
    const int64_t *which;    /* NULL: every row from base[0] */
    const int64_t *rows;
    Py_ssize_t n, d, row_bytes;
} Plan;

static inline const char *row_at(const Plan *p, Py_ssize_t i)
{
    return p->base[p->which ? p->which[i] : 0] + p->rows[i] * p->row_bytes;
}

#if defined(__x86_64__)
#include <immintrin.h>

/* Widened rows go out by streaming (non-temporal) stores, past the cache: a float32 batch is read
 * much later (after the prefetch queue), from memory anyway, and so each output line costs no
 * read for ownership first. Gathering random rows of the kept chunk maps into float32, side by
 * side with ordinary stores: 1.05-1.4x as fast, on one and two threads, from float16 and bfloat16.
 * They need every row 32-byte aligned (torch's buffers are); otherwise ordinary stores. */
static int streams(const Plan *p, const float *out)
{
    return (uintptr_t)out % 32 == 0 && p->d % 8 == 0;
}
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_F16C_PATH 1

__attribute__((target("avx,f16c"))) static void widen_f16_rows(const Plan *p, float *out)
{
    const int stream = streams(p, out);
    for (Py_ssize_t i = 0; i < p->n; i++) {
        const uint16_t *row = (const uint16_t *)row_at(p, i);
        float *dst = out + i * p->d;
        if (i + 1 < p->n)
            __builtin_prefetch(row_at(p, i + 1));
        Py_ssize_t j = 0;
        if (stream)
            for (; j + 8 <= p->d; j += 8)
                _mm256_stream_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + j))));
        for (; j + 8 <= p->d; j += 8)
            _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + j))));
        for (; j < p->d; j++)
            dst[j] = _cvtsh_ss(row[j]);
    }
    if (stream)
        _mm_sfence(); /* streaming stores are weakly ordered: visible before the batch is handed on */
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

static void widen_bf16_rows(const Plan *p, float *out)
{
#if defined(__x86_64__)
    const int stream = streams(p, out);
    const __m128i zero = _mm_setzero_si128();
#endif
    for (Py_ssize_t i = 0; i < p->n; i++) {
        const uint16_t *row = (const uint16_t *)row_at(p, i);
        uint32_t *dst = (uint32_t *)(out + i * p->d);
        if (i + 1 < p->n)
            __builtin_prefetch(row_at(p, i + 1));
        Py_ssize_t j = 0;
#if defined(__x86_64__)
        if (stream)
            for (; j + 8 <= p->d; j += 8) { /* zeros interleaved below each bfloat16: its float32 */
                const __m128i bits = _mm_loadu_si128((const __m128i *)(row + j));
                _mm_stream_si128((__m128i *)(dst + j), _mm_unpacklo_epi16(zero, bits));
                _mm_stream_si128((__m128i *)(dst + j + 4), _mm_unpackhi_epi16(zero, bits));
            }
#endif
        for (; j < p->d; j++)
            dst[j] = (uint32_t)row[j] << 16; /* bfloat16 is the top half of a float32 */
    }
#if defined(__x86_64__)
    if (stream)
        _mm_sfence();
#endif
}

static void copy_rows(const Plan *p, char *out)
{
    for (Py_ssize_t i = 0; i < p->n; i++) {
        if (i + 1 < p->n)
            __builtin_prefetch(row_at(p, i + 1));
        memcpy(out + i * p->row_bytes, row_at(p, i), (size_t)p->row_bytes);
    }
}

/* The buffer's one-character struct format, byte order stripped ("" if it has more). */
static char format_of(const Py_buffer *view)
{
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    return f[0] != '\0' && f[1] == '\0' ? f[0] : '\0';
}

static int is_int64_vector(const Py_buffer *view, Py_ssize_t n)
{
    return view->ndim == 1 && view->itemsize == 8 && view->shape[0] == n && strchr("qlQL", format_of(view)) != NULL;
}

/* Every source a C-contiguous 2-D array of `columns` columns of the format the mode reads. */
static int check_sources(const Py_buffer *views, Py_ssize_t k, int mode, const Py_buffer *out)
{
    for (Py_ssize_t s = 0; s < k; s++) {
        const Py_buffer *v = &views[s];
        char f = format_of(v);
        int ok = v->ndim == 2 && v->shape[1] == out->shape[1];
        if (mode == MODE_COPY)
            ok = ok && f != '\0' && f == format_of(out) && v->itemsize == out->itemsize;
        else
            ok = ok && v->itemsize == 2 && (mode == MODE_WIDEN_F16 ? f == 'e' : (f == 'H' || f == 'h'));
        if (!ok) {
            PyErr_Format(PyExc_TypeError,
                         "source %zd must be a C-contiguous 2-D array of %zd columns, of the output's dtype "
                         "(copy) or of float16 / bfloat16 bits as uint16 (widen)", s, out->shape[1]);
            return 0;
        }
    }
    return 1;
}

/* IndexError (nothing written) for the first row outside its source. */
static int check_rows(const Py_buffer *views, Py_ssize_t k, const int64_t *which, const int64_t *rows, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s = which ? which[i] : 0;
        if (s < 0 || s >= k) {
            PyErr_Format(PyExc_IndexError, "source %lld is out of range for %zd sources", (long long)s, k);
            return 0;
        }
        if (rows[i] < 0 || rows[i] >= views[s].shape[0]) {
            PyErr_Format(PyExc_IndexError, "row %lld is out of range for a source of %zd rows",
                         (long long)rows[i], views[s].shape[0]);
            return 0;
        }
    }
    return 1;
}

static PyObject *take(PyObject *self, PyObject *args)
{
    PyObject *sources_obj, *which_obj, *rows_obj, *out_obj;
    int mode;
    if (!PyArg_ParseTuple(args, "O!OOOi", &PyTuple_Type, &sources_obj, &which_obj, &rows_obj, &out_obj, &mode))
        return NULL;
    if (mode < MODE_COPY || mode > MODE_WIDEN_BF16) {
        PyErr_Format(PyExc_ValueError, "mode %d is not one of 0 (copy), 1 (float16 widen), 2 (bfloat16 widen)", mode);
        return NULL;
    }
    if (mode == MODE_WIDEN_F16 && !cpu_converts_f16()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no F16C instructions: use the Python gather");
        return NULL;
    }
    const Py_ssize_t k = PyTuple_GET_SIZE(sources_obj);
    if (k < 1) {
        PyErr_SetString(PyExc_ValueError, "take needs at least one source");
        return NULL;
    }
    const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT;
    Py_buffer *views = PyMem_Calloc((size_t)k, sizeof(Py_buffer));
    const char **base = PyMem_Calloc((size_t)k, sizeof(char *));
    Py_buffer which = {0}, rows = {0}, out = {0};
    int have_which = which_obj != Py_None, have_rows = 0, have_out = 0;
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    if (views == NULL || base == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < k; got++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(sources_obj, got), &views[got], flags) < 0)
            goto done;
        base[got] = views[got].buf;
    }
    if (have_which && PyObject_GetBuffer(which_obj, &which, flags) < 0) {
        have_which = 0;
        goto done;
    }
    if (PyObject_GetBuffer(rows_obj, &rows, flags) < 0)
        goto done;
    have_rows = 1;
    if (PyObject_GetBuffer(out_obj, &out, flags | PyBUF_WRITABLE) < 0)
        goto done;
    have_out = 1;
    if (out.ndim != 2 || (mode != MODE_COPY && (out.itemsize != 4 || format_of(&out) != 'f'))) {
        PyErr_SetString(PyExc_TypeError, "out must be a C-contiguous 2-D array (float32 to widen into)");
        goto done;
    }
    const Py_ssize_t n = out.shape[0];
    if (!is_int64_vector(&rows, n) || (have_which && !is_int64_vector(&which, n))) {
        PyErr_SetString(PyExc_TypeError, "rows (and which) must be contiguous 1-D int64 arrays of one entry per output row");
        goto done;
    }
    if (!check_sources(views, k, mode, &out) || !check_rows(views, k, have_which ? which.buf : NULL, rows.buf, n))
        goto done;
    Plan plan = {base, have_which ? which.buf : NULL, rows.buf, n, out.shape[1], views[0].itemsize * out.shape[1]};
    Py_BEGIN_ALLOW_THREADS
    if (mode == MODE_COPY)
        copy_rows(&plan, out.buf);
    else if (mode == MODE_WIDEN_BF16)
        widen_bf16_rows(&plan, out.buf);
#if HAVE_F16C_PATH
    else
        widen_f16_rows(&plan, out.buf);
#endif
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t s = 0; s < got; s++)
        PyBuffer_Release(&views[s]);
    if (have_which)
        PyBuffer_Release(&which);
    if (have_rows)
        PyBuffer_Release(&rows);
    if (have_out)
        PyBuffer_Release(&out);
    PyMem_Free(views);
    PyMem_Free(base);
    return result;
}

static PyObject *converts_f16(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(cpu_converts_f16());
}

static PyMethodDef methods[] = {
    {"take", take, METH_VARARGS,
     "take(sources, which, rows, out, mode): out[i] = sources[which[i]][rows[i]] (which None: sources[0]), "
     "copied (mode 0) or widened to float32 from float16 (1) or bfloat16 bits (2); every index checked first."},
    {"converts_f16", converts_f16, METH_NOARGS, "Whether this CPU widens float16 here (F16C)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gather", NULL, -1, methods};

PyMODINIT_FUNC PyInit__gather(void)
{
    return PyModule_Create(&module);
}
