/* Fused Hamming-distance kernel for fgh_deploy.search (optional: the search falls back to numpy).
 *
 * numpy needs one xor, one bitwise_count and one add pass per 64-bit word of a code; at 128 bits
 * those passes cost more than reading the codes from memory. This loop does xor + popcount + sum
 * in one pass over cache-sized tiles. Variants, picked at import by what the CPU has: AVX-512
 * VPOPCNTDQ (the compiler vectorises the plain loop), AVX2 (table-lookup popcount, written out:
 * compilers do not vectorise popcount without VPOPCNT), scalar popcnt, and the plain loop (ARM
 * builds: the compiler vectorises it with the target's own popcount).
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

#define MAX_COLUMNS 32 /* far more than codes of up to 255 bits need (4) */
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

/* Tile by tile, so one tile of every column stays in L1 while the group's queries pass over it. */
#define TILES_BODY(COLUMN)                                                              \
    for (Py_ssize_t row = start; row < stop; row += TILE_ROWS) {                        \
        Py_ssize_t n = stop - row < TILE_ROWS ? stop - row : TILE_ROWS;                 \
        for (Py_ssize_t j = 0; j < group; j++) {                                        \
            uint8_t *o = out + j * ld + (row - start);                                  \
            for (Py_ssize_t w = 0; w < ncols; w++)                                      \
                COLUMN(o, &cols[w], row, n, queries[j * ncols + w], w == 0);            \
        }                                                                               \
    }

#define KERNEL_ARGS                                                                               \
    uint8_t *out, Py_ssize_t ld, const Column *cols, Py_ssize_t ncols, Py_ssize_t start, Py_ssize_t stop, \
        const uint64_t *queries, Py_ssize_t group

static void tiles_generic(KERNEL_ARGS) { TILES_BODY(column_distances) }

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_X86_DISPATCH 1
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,popcnt")))

/* Per-byte popcounts of 32 bytes: two 16-entry table lookups, one per nibble (no VPOPCNT in AVX2). */
AVX2 INLINE __m256i popcount_bytes(__m256i v) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    return _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(v, nibble)),
                           _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble)));
}

AVX2 INLINE void store_bytes(uint8_t *o, __m128i v, int first) {
    if (!first) v = _mm_add_epi8(v, _mm_loadu_si128((const __m128i *)o));
    _mm_storeu_si128((__m128i *)o, v);
}

/* uint64 words, 16 rows per step: four vectors of 4 counts are packed into 16 bytes in row order. */
AVX2 INLINE Py_ssize_t column64_avx2(uint8_t *o, const uint64_t *src, Py_ssize_t n, uint64_t word, int first) {
    const __m256i q = _mm256_set1_epi64x((long long)word), zero = _mm256_setzero_si256();
    /* After the packs below the bytes are rows 0,4,1,5,8,12,9,13,2,6,3,7,10,14,11,15. */
    const __m128i order = _mm_setr_epi8(0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15);
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i c[4];
        for (int k = 0; k < 4; k++) {
            __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(src + i + 4 * k)), q);
            c[k] = _mm256_sad_epu8(popcount_bytes(v), zero); /* one count (<= 64) per 64-bit lane */
        }
        __m256i ab = _mm256_or_si256(c[0], _mm256_slli_epi64(c[1], 32));
        __m256i cd = _mm256_or_si256(c[2], _mm256_slli_epi64(c[3], 32));
        __m256i words16 = _mm256_packus_epi32(ab, cd);
        __m256i bytes = _mm256_packus_epi16(words16, words16);
        __m128i rows = _mm_unpacklo_epi64(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1));
        store_bytes(o + i, _mm_shuffle_epi8(rows, order), first);
    }
    return i;
}

/* uint32 words, 32 rows per step: four vectors of 8 counts are packed into 32 bytes in row order. */
AVX2 INLINE Py_ssize_t column32_avx2(uint8_t *o, const uint32_t *src, Py_ssize_t n, uint32_t word, int first) {
    const __m256i q = _mm256_set1_epi32((int)word);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    Py_ssize_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i c[4];
        for (int k = 0; k < 4; k++) {
            __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(src + i + 8 * k)), q);
            /* byte counts -> pairs (16-bit) -> quads (32-bit): one count per 32-bit lane */
            c[k] = _mm256_madd_epi16(_mm256_maddubs_epi16(popcount_bytes(v), ones8), ones16);
        }
        __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, order);
        store_bytes(o + i, _mm256_castsi256_si128(bytes), first);
        store_bytes(o + i + 16, _mm256_extracti128_si256(bytes, 1), first);
    }
    return i;
}

/* column_distances with AVX2 for 64- and 32-bit words; the rows left over, and narrower words,
 * take the scalar loop. */
AVX2 INLINE void column_distances_avx2(uint8_t *restrict o, const Column *col, Py_ssize_t row, Py_ssize_t n,
                                       uint64_t word, int first) {
    Py_ssize_t done = 0;
    if (col->itemsize == 8)
        done = column64_avx2(o, (const uint64_t *)col->data + row, n, word, first);
    else if (col->itemsize == 4)
        done = column32_avx2(o, (const uint32_t *)col->data + row, n, (uint32_t)word, first);
    if (done < n) column_distances(o + done, col, row + done, n - done, word, first);
}

__attribute__((target("popcnt"))) static void tiles_popcnt(KERNEL_ARGS) { TILES_BODY(column_distances) }
AVX2 static void tiles_avx2(KERNEL_ARGS) { TILES_BODY(column_distances_avx2) }
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq"))) static void tiles_avx512(KERNEL_ARGS) {
    TILES_BODY(column_distances)
}
#endif

typedef void (*Kernel)(KERNEL_ARGS);

typedef struct {
    const char *name;
    Kernel run;
} Variant;

/* The variants this CPU can run, fastest first (Python: VARIANTS); the first is the default (KERNEL). */
static Variant variants[4];
static int n_variants = 0;

static void find_variants(void) {
#ifdef HAVE_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        variants[n_variants++] = (Variant){"avx512-vpopcntdq", tiles_avx512};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt"))
        variants[n_variants++] = (Variant){"avx2", tiles_avx2};
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
