/*
 * HDF5 chunk work over a whole dataset or block, with the GIL released.
 *
 * write_chunks stores a batch of already-encoded chunks; chunk_table lists a
 * dataset's chunks (position, file address, size, filter mask); gather_cut
 * cuts a row band into chunks while gathering its columns (permute).
 *
 * Why this exists (docs/performance.md): h5py's write_direct_chunk holds the
 * GIL for the whole library call, about 11 us of HDF5 work a chunk (B-tree
 * insert, file-space allocation, pwrite).  A permute of the Loom benchmark
 * file stores 244,766 chunks, so the writer held the GIL for seconds while
 * the tasks encoding the next batch waited for it.  Here Python hands over a
 * whole block's chunks and the loop runs without the GIL; the caller holds
 * h5py's own lock, so no other thread enters HDF5 meanwhile.  Listing the
 * 244,766 chunks of that file through h5py's chunk_iter called back into
 * Python for each (0.8 s with the GIL held); chunk_table fills arrays.
 *
 * HDF5 itself is not linked: Python passes the addresses of H5Dwrite_chunk and H5Dchunk_iter
 * from the library h5py loaded (see _direct.py), so this file needs nothing
 * beyond Python's headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* herr_t H5Dwrite_chunk(hid_t dset, hid_t dxpl, uint32_t filters, const hsize_t *offset, size_t size, const void *buf) */
typedef int (*write_fn)(int64_t, int64_t, uint32_t, const uint64_t *, size_t, const void *);
/* herr_t H5Dchunk_iter(hid_t dset, hid_t dxpl, H5D_chunk_iter_op_t cb, void *op_data), where
 * int cb(const hsize_t *offset, unsigned filter_mask, haddr_t addr, hsize_t size, void *op_data) */
typedef int (*iter_op)(const uint64_t *, unsigned, uint64_t, uint64_t, void *);
typedef int (*iter_fn)(int64_t, int64_t, iter_op, void *);

/* write_chunks(dset, dxpl, offsets, rank, raws, fn) -> chunks stored
 * offsets holds len(raws) * rank uint64 values, chunk k's at [k * rank, (k + 1) * rank).
 * Stops at the first chunk HDF5 refuses and returns its index (the caller
 * stores it again through h5py, which raises HDF5's error). */
static PyObject *
write_chunks(PyObject *Py_UNUSED(self), PyObject *args)
{
    long long dset, dxpl;
    PyObject *o_offs, *raws;
    Py_ssize_t rank;
    unsigned long long a_write;
    if (!PyArg_ParseTuple(args, "LLOnOK", &dset, &dxpl, &o_offs, &rank, &raws, &a_write))
        return NULL;
    if (rank <= 0) {
        PyErr_SetString(PyExc_ValueError, "rank must be positive");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(raws, "raws must be a sequence of buffers");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0, done = 0;
    PyObject *result = NULL;
    Py_buffer ov;
    int have_ov = 0;
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    if (PyObject_GetBuffer(o_offs, &ov, PyBUF_SIMPLE) < 0)
        goto out;
    have_ov = 1;
    if (ov.len != n * rank * (Py_ssize_t)sizeof(uint64_t)) {
        PyErr_Format(PyExc_ValueError, "offsets must hold %zd uint64 values", n * rank);
        goto out;
    }
    for (; got < n; got++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &views[got], PyBUF_SIMPLE) < 0)
            goto out;
    write_fn write = (write_fn)(uintptr_t)a_write;
    const uint64_t *offs = (const uint64_t *)ov.buf;
    Py_BEGIN_ALLOW_THREADS
    for (; done < n; done++)
        if (write((int64_t)dset, (int64_t)dxpl, 0, offs + done * rank, (size_t)views[done].len, views[done].buf) < 0)
            break;
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(done);
out:
    while (got > 0)
        PyBuffer_Release(&views[--got]);
    PyMem_Free(views);
    if (have_ov)
        PyBuffer_Release(&ov);
    Py_DECREF(seq);
    return result;
}

typedef struct {
    uint64_t *coords, *addr, *size;
    uint32_t *mask;
    Py_ssize_t n, cap, rank;
} Table;

static int
table_add(const uint64_t *offset, unsigned filter_mask, uint64_t addr, uint64_t size, void *op_data)
{
    Table *t = (Table *)op_data;
    if (t->n >= t->cap)
        return -1; /* more chunks than the grid holds: stop, the caller asks h5py */
    for (Py_ssize_t d = 0; d < t->rank; d++)
        t->coords[t->n * t->rank + d] = offset[d];
    t->addr[t->n] = addr;
    t->size[t->n] = size;
    t->mask[t->n] = (uint32_t)filter_mask;
    t->n++;
    return 0;
}

static int
table_view(PyObject *obj, Py_buffer *view, Py_ssize_t nbytes, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len != nbytes) {
        PyErr_Format(PyExc_ValueError, "%s must hold %zd bytes", name, nbytes);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* chunk_table(dset, dxpl, rank, coords, addr, size, mask, fn) -> chunks listed, or -1 when HDF5 failed
 * coords: cap * rank uint64 (each chunk's first element), addr and size: cap uint64, mask: cap uint32. */
static PyObject *
chunk_table(PyObject *Py_UNUSED(self), PyObject *args)
{
    long long dset, dxpl;
    Py_ssize_t rank;
    PyObject *o[4];
    unsigned long long a_iter;
    if (!PyArg_ParseTuple(args, "LLnOOOOK", &dset, &dxpl, &rank, &o[0], &o[1], &o[2], &o[3], &a_iter))
        return NULL;
    if (rank <= 0) {
        PyErr_SetString(PyExc_ValueError, "rank must be positive");
        return NULL;
    }
    Py_buffer v[4];
    int nv = 0;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(o[1], &v[1], PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t cap = v[1].len / (Py_ssize_t)sizeof(uint64_t);
    PyBuffer_Release(&v[1]);
    const Py_ssize_t need[4] = {cap * rank * 8, cap * 8, cap * 8, cap * 4};
    const char *names[4] = {"coords", "addr", "size", "mask"};
    for (; nv < 4; nv++)
        if (table_view(o[nv], &v[nv], need[nv], names[nv]) < 0)
            goto out;
    Table t = {v[0].buf, v[1].buf, v[2].buf, v[3].buf, 0, cap, rank};
    iter_fn iter = (iter_fn)(uintptr_t)a_iter;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = iter((int64_t)dset, (int64_t)dxpl, table_add, &t);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(rc < 0 ? -1 : t.n);
out:
    while (nv > 0)
        PyBuffer_Release(&v[--nv]);
    return result;
}

/* gather_cut(src, rows, cols, itemsize, index, c0, c1, fill, out)
 * src: a C-contiguous rows x cols array of itemsize-byte elements; index: int64 source columns of the
 * output's columns; out: ceil(rows / c0) x ceil(len(index) / c1) chunks of c0 x c1 elements, C order,
 * chunk (i, j) element (r, c) = src[i * c0 + r, index[j * c1 + c]], past the edges = fill.
 * One pass: each source row is read (randomly) while it sits in cache, and written once, where
 * numpy's take and a second, cutting copy would write and read the band twice. */
static PyObject *
gather_cut(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *o_src, *o_idx, *o_fill, *o_out;
    Py_ssize_t rows, cols, isz, c0, c1;
    if (!PyArg_ParseTuple(args, "OnnnOnnOO", &o_src, &rows, &cols, &isz, &o_idx, &c0, &c1, &o_fill, &o_out))
        return NULL;
    if (rows < 0 || cols < 0 || isz <= 0 || c0 <= 0 || c1 <= 0) {
        PyErr_SetString(PyExc_ValueError, "sizes must be positive");
        return NULL;
    }
    Py_buffer sv, iv, fv, ov;
    int n = 0;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(o_src, &sv, PyBUF_SIMPLE) < 0)
        return NULL;
    n = 1;
    if (PyObject_GetBuffer(o_idx, &iv, PyBUF_SIMPLE) < 0)
        goto out;
    n = 2;
    if (PyObject_GetBuffer(o_fill, &fv, PyBUF_SIMPLE) < 0)
        goto out;
    n = 3;
    if (PyObject_GetBuffer(o_out, &ov, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0)
        goto out;
    n = 4;
    Py_ssize_t m = iv.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t g0 = (rows + c0 - 1) / c0, g1 = (m + c1 - 1) / c1;
    if (sv.len != rows * cols * isz || iv.len != m * (Py_ssize_t)sizeof(int64_t) || fv.len != isz ||
        ov.len != g0 * g1 * c0 * c1 * isz) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the shapes");
        goto out;
    }
    const int64_t *idx = (const int64_t *)iv.buf;
    for (Py_ssize_t k = 0; k < m; k++) {
        if (idx[k] < 0 || idx[k] >= cols) {
            PyErr_Format(PyExc_IndexError, "column %lld is outside 0..%zd", (long long)idx[k], cols - 1);
            goto out;
        }
    }
    const char *src = (const char *)sv.buf, *fill = (const char *)fv.buf;
    char *dst = (char *)ov.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < g0; i++) {
        for (Py_ssize_t r = 0; r < c0; r++) {
            Py_ssize_t row = i * c0 + r;
            const char *srow = row < rows ? src + row * cols * isz : NULL;
            for (Py_ssize_t j = 0; j < g1; j++) {
                char *t = dst + (((i * g1 + j) * c0 + r) * c1) * isz;
                Py_ssize_t c = 0, w = m - j * c1 < c1 ? m - j * c1 : c1;
                const int64_t *ix = idx + j * c1;
                if (srow != NULL) {
                    if (isz == 4)
                        for (; c < w; c++)
                            ((uint32_t *)t)[c] = ((const uint32_t *)srow)[ix[c]];
                    else if (isz == 8)
                        for (; c < w; c++)
                            ((uint64_t *)t)[c] = ((const uint64_t *)srow)[ix[c]];
                    else
                        for (; c < w; c++)
                            memcpy(t + c * isz, srow + ix[c] * isz, (size_t)isz);
                }
                for (; c < c1; c++)
                    memcpy(t + c * isz, fill, (size_t)isz);
            }
        }
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
out:
    if (n >= 4)
        PyBuffer_Release(&ov);
    if (n >= 3)
        PyBuffer_Release(&fv);
    if (n >= 2)
        PyBuffer_Release(&iv);
    PyBuffer_Release(&sv);
    return result;
}

static PyMethodDef methods[] = {
    {"gather_cut", gather_cut, METH_VARARGS,
     "gather_cut(src, rows, cols, itemsize, index, c0, c1, fill, out): cut a row band into chunks, gathering columns"},
    {"write_chunks", write_chunks, METH_VARARGS, "write_chunks(dset, dxpl, offsets, rank, raws, fn) -> chunks stored"},
    {"chunk_table", chunk_table, METH_VARARGS,
     "chunk_table(dset, dxpl, rank, coords, addr, size, mask, fn) -> chunks listed, or -1 when HDF5 failed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_chunkcalls", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC
PyInit__chunkcalls(void)
{
    return PyModule_Create(&module);
}
