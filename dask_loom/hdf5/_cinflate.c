/*
 * Inflate a batch of zlib streams with libdeflate, holding the GIL once per batch.
 *
 * Why this exists (docs/performance.md): loompy's 16 KiB chunks inflate in
 * about 6-8 us each.  A per-chunk call from Python (the `deflate` package, or
 * libdeflate through ctypes) adds about 1.7 us of interpreter work and a GIL
 * hand-off per chunk, so two threads decode only about 1.35x faster than one.
 * Here Python hands over a whole block's chunks and the loop runs with the
 * GIL released.  `inflate_place` also writes each decoded chunk straight to
 * its place in a row-major output (through a small buffer that stays in the
 * CPU cache) instead of a second pass over a staging copy.
 *
 * libdeflate itself is not linked: the `deflate` package's extension module
 * exports its symbols and Python passes their addresses (see _inflate.py), so
 * this file needs nothing beyond Python's headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef void *(*alloc_fn)(void);
typedef int (*inflate_fn)(void *, const void *, size_t, void *, size_t, size_t *);
typedef void (*free_fn)(void *);

typedef struct {
    PyObject *seq;
    Py_ssize_t n;
    Py_buffer *views;
    Py_ssize_t got;
} Inputs;

static void
inputs_release(Inputs *in)
{
    for (Py_ssize_t k = 0; k < in->got; k++)
        PyBuffer_Release(&in->views[k]);
    PyMem_Free(in->views);
    Py_XDECREF(in->seq);
}

static int
inputs_get(Inputs *in, PyObject *raws)
{
    in->views = NULL;
    in->got = 0;
    in->seq = PySequence_Fast(raws, "raws must be a sequence of buffers");
    if (in->seq == NULL)
        return -1;
    in->n = PySequence_Fast_GET_SIZE(in->seq);
    in->views = PyMem_Calloc(in->n ? in->n : 1, sizeof(Py_buffer));
    if (in->views == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < in->n; k++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(in->seq, k), &in->views[k], PyBUF_SIMPLE) < 0)
            return -1;
        in->got = k + 1;
    }
    return 0;
}

/* An int64 array argument of exactly n entries. */
static int
int64_view(PyObject *obj, Py_buffer *view, Py_ssize_t n, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len != n * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "%s must hold %zd int64 values", name, n);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *
failed_list(const int *rc, Py_ssize_t n)
{
    /* The chunks libdeflate refused (0 is LIBDEFLATE_SUCCESS): Python decides with zlib. */
    PyObject *failed = PyList_New(0);
    for (Py_ssize_t k = 0; failed != NULL && k < n; k++) {
        if (rc[k] != 0) {
            PyObject *i = PyLong_FromSsize_t(k);
            int bad = i == NULL || PyList_Append(failed, i) < 0;
            Py_XDECREF(i);
            if (bad)
                Py_CLEAR(failed);
        }
    }
    return failed;
}

/* inflate_many(raws, out, nbytes, slots, alloc, inflate, free) -> refused indices
 * Chunk k decodes into out[slots[k] * nbytes : (slots[k] + 1) * nbytes]. */
static PyObject *
inflate_many(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *raws, *out, *slots;
    Py_ssize_t nbytes;
    unsigned long long a_alloc, a_inflate, a_free;
    if (!PyArg_ParseTuple(args, "OOnOKKK", &raws, &out, &nbytes, &slots, &a_alloc, &a_inflate, &a_free))
        return NULL;
    if (nbytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "nbytes must be positive");
        return NULL;
    }
    Inputs in;
    Py_buffer ov, sv;
    PyObject *result = NULL;
    int *rc = NULL;
    int have_ov = 0, have_sv = 0;
    if (inputs_get(&in, raws) < 0)
        goto done;
    if (PyObject_GetBuffer(out, &ov, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0)
        goto done;
    have_ov = 1;
    if (int64_view(slots, &sv, in.n, "slots") < 0)
        goto done;
    have_sv = 1;
    const int64_t *slot = (const int64_t *)sv.buf;
    for (Py_ssize_t k = 0; k < in.n; k++) {
        if (slot[k] < 0 || slot[k] > (ov.len / nbytes) - 1) {
            PyErr_Format(PyExc_ValueError, "slot %lld does not fit an output of %zd bytes", (long long)slot[k], ov.len);
            goto done;
        }
    }
    rc = PyMem_Calloc(in.n ? in.n : 1, sizeof(int));
    if (rc == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    alloc_fn alloc = (alloc_fn)(uintptr_t)a_alloc;
    inflate_fn inflate = (inflate_fn)(uintptr_t)a_inflate;
    free_fn release = (free_fn)(uintptr_t)a_free;
    int nomem = 0;
    Py_BEGIN_ALLOW_THREADS
    void *d = alloc();
    if (d == NULL) {
        nomem = 1;
    } else {
        char *base = (char *)ov.buf;
        for (Py_ssize_t k = 0; k < in.n; k++)
            rc[k] = inflate(d, in.views[k].buf, (size_t)in.views[k].len, base + slot[k] * nbytes, (size_t)nbytes, NULL);
        release(d);
    }
    Py_END_ALLOW_THREADS
    if (nomem)
        PyErr_NoMemory();
    else
        result = failed_list(rc, in.n);
done:
    PyMem_Free(rc);
    if (have_sv)
        PyBuffer_Release(&sv);
    if (have_ov)
        PyBuffer_Release(&ov);
    inputs_release(&in);
    return result;
}

/* inflate_place(raws, out, nbytes, src_off, dst_off, nrows, row_bytes, src_stride, dst_stride, alloc, inflate, free)
 * Chunk k decodes (nbytes) into a scratch buffer; then nrows[k] rows of row_bytes[k] bytes are copied from
 * scratch + src_off[k] (rows src_stride apart) to out + dst_off[k] (rows dst_stride apart). */
static PyObject *
inflate_place(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *raws, *out, *o_src, *o_dst, *o_rows, *o_rowb;
    Py_ssize_t nbytes, src_stride, dst_stride;
    unsigned long long a_alloc, a_inflate, a_free;
    if (!PyArg_ParseTuple(args, "OOnOOOOnnKKK", &raws, &out, &nbytes, &o_src, &o_dst, &o_rows, &o_rowb,
                          &src_stride, &dst_stride, &a_alloc, &a_inflate, &a_free))
        return NULL;
    if (nbytes <= 0 || src_stride <= 0 || dst_stride <= 0) {
        PyErr_SetString(PyExc_ValueError, "sizes and strides must be positive");
        return NULL;
    }
    Inputs in;
    Py_buffer ov, bs[4];
    int nb = 0, have_ov = 0;
    PyObject *result = NULL;
    int *rc = NULL;
    char *scratch = NULL;
    if (inputs_get(&in, raws) < 0)
        goto done;
    if (PyObject_GetBuffer(out, &ov, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0)
        goto done;
    have_ov = 1;
    PyObject *objs[4] = {o_src, o_dst, o_rows, o_rowb};
    const char *names[4] = {"src_off", "dst_off", "nrows", "row_bytes"};
    for (; nb < 4; nb++)
        if (int64_view(objs[nb], &bs[nb], in.n, names[nb]) < 0)
            goto done;
    const int64_t *src = bs[0].buf, *dst = bs[1].buf, *rows = bs[2].buf, *rowb = bs[3].buf;
    for (Py_ssize_t k = 0; k < in.n; k++) {
        /* Every copy must stay inside the scratch chunk and the output. */
        if (rows[k] < 0 || rowb[k] < 0 || src[k] < 0 || dst[k] < 0 ||
            (rows[k] > 0 && (src[k] + (rows[k] - 1) * src_stride + rowb[k] > nbytes ||
                             dst[k] + (rows[k] - 1) * dst_stride + rowb[k] > ov.len))) {
            PyErr_Format(PyExc_ValueError, "chunk %zd's placement falls outside its chunk or the output", k);
            goto done;
        }
    }
    rc = PyMem_Calloc(in.n ? in.n : 1, sizeof(int));
    scratch = PyMem_Malloc((size_t)nbytes);
    if (rc == NULL || scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    alloc_fn alloc = (alloc_fn)(uintptr_t)a_alloc;
    inflate_fn inflate = (inflate_fn)(uintptr_t)a_inflate;
    free_fn release = (free_fn)(uintptr_t)a_free;
    int nomem = 0;
    Py_BEGIN_ALLOW_THREADS
    void *d = alloc();
    if (d == NULL) {
        nomem = 1;
    } else {
        char *base = (char *)ov.buf;
        for (Py_ssize_t k = 0; k < in.n; k++) {
            rc[k] = inflate(d, in.views[k].buf, (size_t)in.views[k].len, scratch, (size_t)nbytes, NULL);
            if (rc[k] != 0)
                continue;
            const char *s = scratch + src[k];
            char *t = base + dst[k];
            for (int64_t r = 0; r < rows[k]; r++, s += src_stride, t += dst_stride)
                memcpy(t, s, (size_t)rowb[k]);
        }
        release(d);
    }
    Py_END_ALLOW_THREADS
    if (nomem)
        PyErr_NoMemory();
    else
        result = failed_list(rc, in.n);
done:
    PyMem_Free(rc);
    PyMem_Free(scratch);
    while (nb > 0)
        PyBuffer_Release(&bs[--nb]);
    if (have_ov)
        PyBuffer_Release(&ov);
    inputs_release(&in);
    return result;
}

static PyMethodDef methods[] = {
    {"inflate_many", inflate_many, METH_VARARGS,
     "inflate_many(raws, out, nbytes, slots, alloc, inflate, free) -> refused chunk indices"},
    {"inflate_place", inflate_place, METH_VARARGS,
     "inflate_place(raws, out, nbytes, src_off, dst_off, nrows, row_bytes, src_stride, dst_stride, alloc, inflate, free)"
     " -> refused chunk indices"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cinflate", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC
PyInit__cinflate(void)
{
    return PyModule_Create(&module);
}
