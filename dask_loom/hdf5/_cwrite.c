/*
 * Store a batch of already-encoded HDF5 chunks with the GIL released.
 *
 * Why this exists (docs/performance.md): h5py's write_direct_chunk holds the
 * GIL for the whole library call, about 11 us of HDF5 work a chunk (B-tree
 * insert, file-space allocation, pwrite).  A permute of the Loom benchmark
 * file stores 244,766 chunks, so the writer held the GIL for seconds while
 * the tasks encoding the next batch waited for it.  Here Python hands over a
 * whole block's chunks and the loop runs without the GIL; the caller holds
 * h5py's own lock, so no other thread enters HDF5 meanwhile.
 *
 * HDF5 itself is not linked: Python passes the address of H5Dwrite_chunk
 * from the library h5py loaded (see _direct.py), so this file needs nothing
 * beyond Python's headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* herr_t H5Dwrite_chunk(hid_t dset, hid_t dxpl, uint32_t filters, const hsize_t *offset, size_t size, const void *buf) */
typedef int (*write_fn)(int64_t, int64_t, uint32_t, const uint64_t *, size_t, const void *);

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

static PyMethodDef methods[] = {
    {"write_chunks", write_chunks, METH_VARARGS, "write_chunks(dset, dxpl, offsets, rank, raws, fn) -> chunks stored"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cwrite", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC
PyInit__cwrite(void)
{
    return PyModule_Create(&module);
}
