/* Fused Hamming-distance kernel for fgh_deploy.search (optional: the search falls back to numpy).
 *
 * numpy needs one xor, one bitwise_count and one add pass per 64-bit word of a code; at 128 bits
 * those passes cost more than reading the codes from memory. This loop does xor + popcount + sum
 * in one pass over cache-sized tiles, with AVX-512 VPOPCNTDQ where the CPU has it.
 *
 * step_distances(out, ld, columns, start, stop, queries) writes, for query j and row i in
 * [start, stop):  out[j * ld + (i - start)] = sum_w popcount(columns[w][i] ^ queries[j * W + w])
 * where columns are the searcher's word columns (itemsize 1, 2, 4 or 8, one value per database
 * row), queries holds each query's words zero-extended to uint64, and out is uint8 (distances of
 * codes up to 255 bits). The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_COLUMNS 31 /* 31 words of 8 bytes hold more than 255 bits */
#define TILE_ROWS 512  /* a tile of every column (4 KiB per uint64 column) stays in L1 across a query group */

#if defined(_MSC_VER) && !defined(__clang__)
#define restrict __restrict
#endif

#if defined(__GNUC__) || defined(__clang__)
#define POPCOUNT64(x) ((unsigned)__builtin_popcountll(x))
#define INLINE static inline __attribute__((always_inline))
#else
static unsigned popcount64_swar(uint64_t x) {
    x -= (x >> 1) & 0x5555555555555555ULL;
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (unsigned)((x * 0x0101010101010101ULL) >> 56);
}
#define POPCOUNT64(x) popcount64_swar(x)
#define INLINE static __inline
#endif

typedef struct {
    const void *data;
    Py_ssize_t itemsize;
} Column;

/* One column's contribution to one query's distances over n rows: first column assigns, the
 * others add. One loop per word width, so each vectorises on its own. */
#define COLUMN_LOOP(T)                                                                  \
    do {                                                                                \
        const T *restrict src = (const T *)col->data + row;                             \
        const T q = (T)word;                                                            \
        if (first)                                                                      \
            for (Py_ssize_t i = 0; i < n; i++) o[i] = (uint8_t)POPCOUNT64(src[i] ^ q);  \
        else                                                                            \
            for (Py_ssize_t i = 0; i < n; i++) o[i] += (uint8_t)POPCOUNT64(src[i] ^ q); \
    } while (0)

INLINE void column_distances(uint8_t *restrict o, const Column *col, Py_ssize_t row, Py_ssize_t n,
                             uint64_t word, int first) {
    switch (col->itemsize) {
        case 8: COLUMN_LOOP(uint64_t); break;
        case 4: COLUMN_LOOP(uint32_t); break;
        case 2: COLUMN_LOOP(uint16_t); break;
        default: COLUMN_LOOP(uint8_t); break;
    }
}

INLINE void tiles(uint8_t *out, Py_ssize_t ld, const Column *cols, Py_ssize_t ncols, Py_ssize_t start,
                  Py_ssize_t stop, const uint64_t *queries, Py_ssize_t group) {
    for (Py_ssize_t row = start; row < stop; row += TILE_ROWS) {
        Py_ssize_t n = stop - row < TILE_ROWS ? stop - row : TILE_ROWS;
        for (Py_ssize_t j = 0; j < group; j++) {
            uint8_t *o = out + j * ld + (row - start);
            for (Py_ssize_t w = 0; w < ncols; w++)
                column_distances(o, &cols[w], row, n, queries[j * ncols + w], w == 0);
        }
    }
}

#define KERNEL_ARGS                                                                               \
    uint8_t *out, Py_ssize_t ld, const Column *cols, Py_ssize_t ncols, Py_ssize_t start, Py_ssize_t stop, \
        const uint64_t *queries, Py_ssize_t group
#define KERNEL_CALL out, ld, cols, ncols, start, stop, queries, group

static void tiles_generic(KERNEL_ARGS) { tiles(KERNEL_CALL); }

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_X86_DISPATCH 1
__attribute__((target("popcnt"))) static void tiles_popcnt(KERNEL_ARGS) { tiles(KERNEL_CALL); }
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq"))) static void tiles_avx512(KERNEL_ARGS) {
    tiles(KERNEL_CALL);
}
#endif

typedef void (*Kernel)(KERNEL_ARGS);

typedef struct {
    const char *name;
    Kernel run;
} Variant;

/* The variants this CPU can run, fastest first (Python: VARIANTS); the first is the default (KERNEL). */
static Variant variants[3];
static int n_variants = 0;

static void find_variants(void) {
#ifdef HAVE_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        variants[n_variants++] = (Variant){"avx512-vpopcntdq", tiles_avx512};
    if (__builtin_cpu_supports("popcnt")) variants[n_variants++] = (Variant){"popcnt", tiles_popcnt};
#endif
    variants[n_variants++] = (Variant){"generic", tiles_generic};
}

static void release_all(Py_buffer *views, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) PyBuffer_Release(&views[i]);
}

static PyObject *step_distances(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *out_obj, *columns, *queries_obj;
    Py_ssize_t ld, start, stop;
    const char *variant_name = NULL;
    if (!PyArg_ParseTuple(args, "OnOnnO|s:step_distances", &out_obj, &ld, &columns, &start, &stop, &queries_obj,
                          &variant_name))
        return NULL;
    Kernel kernel = variants[0].run;
    if (variant_name != NULL) {
        int v = 0;
        while (v < n_variants && strcmp(variants[v].name, variant_name) != 0) v++;
        if (v == n_variants)
            return PyErr_Format(PyExc_ValueError, "variant '%s' does not run on this CPU", variant_name);
        kernel = variants[v].run;
    }
    PyObject *seq = PySequence_Fast(columns, "columns must be a sequence of buffers");
    if (seq == NULL) return NULL;
    Py_ssize_t ncols = PySequence_Fast_GET_SIZE(seq);
    if (ncols < 1 || ncols > MAX_COLUMNS) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "need 1 to %d columns, got %zd", MAX_COLUMNS, ncols);
    }
    /* views[0]: out, views[1]: queries, views[2 + w]: column w */
    Py_buffer views[MAX_COLUMNS + 2];
    Column cols[MAX_COLUMNS];
    Py_ssize_t held = 0;
    if (PyObject_GetBuffer(out_obj, &views[held], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto fail;
    held++;
    if (PyObject_GetBuffer(queries_obj, &views[held], PyBUF_C_CONTIGUOUS) < 0) goto fail;
    held++;
    Py_ssize_t rows = -1;
    for (Py_ssize_t w = 0; w < ncols; w++) {
        Py_buffer *view = &views[held];
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, w), view, PyBUF_C_CONTIGUOUS) < 0) goto fail;
        held++;
        Py_ssize_t size = view->itemsize;
        if (size != 1 && size != 2 && size != 4 && size != 8) {
            PyErr_Format(PyExc_ValueError, "column %zd has itemsize %zd, not 1, 2, 4 or 8", w, size);
            goto fail;
        }
        if (rows >= 0 && view->len / size != rows) {
            PyErr_SetString(PyExc_ValueError, "columns differ in length");
            goto fail;
        }
        rows = view->len / size;
        cols[w].data = view->buf;
        cols[w].itemsize = size;
    }
    Py_buffer *out = &views[0], *queries = &views[1];
    if (out->itemsize != 1 || queries->itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "out must be uint8 and queries uint64");
        goto fail;
    }
    Py_ssize_t words = queries->len / 8;
    if (words % ncols != 0 || words == 0) {
        PyErr_Format(PyExc_ValueError, "queries hold %zd words, not a positive multiple of %zd columns", words, ncols);
        goto fail;
    }
    Py_ssize_t group = words / ncols;
    if (start < 0 || stop < start || stop > rows) {
        PyErr_Format(PyExc_ValueError, "rows %zd:%zd outside 0:%zd", start, stop, rows);
        goto fail;
    }
    if (stop > start && (ld < stop - start || (group - 1) * ld + (stop - start) > out->len)) {
        PyErr_Format(PyExc_ValueError, "out (%zd bytes, ld %zd) too small for %zd x %zd distances", out->len, ld,
                     group, stop - start);
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    kernel((uint8_t *)out->buf, ld, cols, ncols, start, stop, (const uint64_t *)queries->buf, group);
    Py_END_ALLOW_THREADS
    release_all(views, held);
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    release_all(views, held);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"step_distances", step_distances, METH_VARARGS,
     "step_distances(out, ld, columns, start, stop, queries[, variant]): uint8 Hamming distances of a "
     "query group to database rows start:stop, written to out[j * ld + (row - start)]; variant: one of "
     "VARIANTS (default: the first)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hamming", "Fused Hamming-distance kernel.", -1, methods,
                                     NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__hamming(void) {
    if (n_variants == 0) find_variants();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *names = PyTuple_New(n_variants);
    for (int v = 0; names != NULL && v < n_variants; v++) {
        PyObject *name = PyUnicode_FromString(variants[v].name);
        if (name == NULL) Py_CLEAR(names);
        else PyTuple_SET_ITEM(names, v, name);
    }
    /* PyModule_AddObject steals the reference only on success. */
    if (names == NULL || PyModule_AddObject(m, "VARIANTS", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "KERNEL", variants[0].name) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
