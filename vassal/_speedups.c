/* The uwsgi protocol's vars block parsed in C (vassal.uwsgiproto has the
 * same function in Python, used when this module was not built).
 *
 * nginx opens one upstream connection per request, and the ~15 vars of
 * uwsgi_params cost a Python loop several microseconds per request: the
 * largest single share of a hello-world request's time in the worker. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
parse_vars(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t start = 0, end = -1;
    PyObject *defaults = NULL, *overrides = NULL;
    if (!PyArg_ParseTuple(args, "y*|nnO!O!", &buf, &start, &end, &PyDict_Type, &defaults, &PyDict_Type, &overrides))
        return NULL;
    if (end < 0 || end > buf.len)
        end = buf.len;
    if (start < 0)
        start = 0;
    const unsigned char *p = (const unsigned char *) buf.buf;
    const char *error = NULL;
    /* With defaults: a copy of them, the vars over it, the overrides last
     * (the WSGI environ of a request in one call). */
    PyObject *env = defaults != NULL ? PyDict_Copy(defaults) : PyDict_New();
    if (env == NULL)
        goto fail;
    Py_ssize_t off = start;
    while (off < end) {
        if (off + 2 > end) {
            error = "truncated key length";
            break;
        }
        Py_ssize_t key_start = off + 2;
        Py_ssize_t key_end = key_start + (p[off] | (p[off + 1] << 8));
        if (key_end + 2 > end) {
            error = key_end <= end ? "truncated value length" : "truncated key";
            break;
        }
        Py_ssize_t value_start = key_end + 2;
        Py_ssize_t value_end = value_start + (p[key_end] | (p[key_end + 1] << 8));
        if (value_end > end) {
            error = "truncated value";
            break;
        }
        PyObject *key = PyUnicode_DecodeLatin1((const char *) p + key_start, key_end - key_start, NULL);
        if (key == NULL)
            goto fail;
        PyUnicode_InternInPlace(&key);
        PyObject *value = PyUnicode_DecodeLatin1((const char *) p + value_start, value_end - value_start, NULL);
        if (value == NULL) {
            Py_DECREF(key);
            goto fail;
        }
        int failed = PyDict_SetItem(env, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed)
            goto fail;
        off = value_end;
    }
    PyBuffer_Release(&buf);
    if (error != NULL) {
        Py_DECREF(env);
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    if (overrides != NULL && PyDict_Update(env, overrides) != 0) {
        Py_DECREF(env);
        return NULL;
    }
    return env;
fail:
    Py_XDECREF(env);
    PyBuffer_Release(&buf);
    return NULL;
}

static PyMethodDef methods[] = {
    {"parse_vars", parse_vars, METH_VARARGS,
     "parse_vars(block, start=0, end=len(block), defaults=None, overrides=None) -> dict: the uwsgi "
     "vars of block[start:end] (latin-1 keys and values) over a copy of defaults, overrides applied "
     "last; ValueError naming the truncation."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vassal._speedups", "C versions of hot paths (optional).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
