/* The uwsgi protocol's vars block parsed in C (vassal.uwsgiproto has the
 * same function in Python, used when this module was not built).
 *
 * nginx opens one upstream connection per request, and the ~15 vars of
 * uwsgi_params cost a Python loop several microseconds per request: the
 * largest single share of a hello-world request's time in the worker. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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

/* accept4(SOCK_NONBLOCK | SOCK_CLOEXEC) and a first read, in one call:
 * None if no connection waits; (fd, data) with data None if nothing was
 * there to read yet, b"" if the peer already closed. */
static PyObject *
accept_read(PyObject *self, PyObject *args)
{
    int listen_fd;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "in", &listen_fd, &size))
        return NULL;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, size);
    if (data == NULL) {
        close(fd);
        return NULL;
    }
    ssize_t got;
    Py_BEGIN_ALLOW_THREADS
    got = read(fd, PyBytes_AS_STRING(data), size);
    Py_END_ALLOW_THREADS
    if (got < 0) {
        Py_DECREF(data);
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return Py_BuildValue("(iO)", fd, Py_None);
        int saved = errno;
        close(fd);
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (_PyBytes_Resize(&data, got) != 0) {
        close(fd);
        return NULL;
    }
    PyObject *result = Py_BuildValue("(iN)", fd, data);
    if (result == NULL)
        close(fd);
    return result;
}


/* RFC 9110 tchar. */
static unsigned char tchar[256];
/* Octets a field value may hold: not the controls (HTAB allowed). */
static unsigned char vchar[256];
/* Octets of a request target: visible ASCII and obs-text, no space. */
static unsigned char target_char[256];

static void
init_tables(void)
{
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = 0; c < 256; c++) {
        tchar[c] = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c && strchr(extra, c));
        vchar[c] = c == '\t' || (c >= 0x20 && c != 0x7f);
        target_char[c] = c > 0x20 && c != 0x7f;
    }
}

/* The lexing half of vassal.http_parser's whole-head fast path, the same
 * rules as its Python: a request line and fields that are plain and within
 * the limits give (end, method, target, minor, [(lower-case name, value)]);
 * anything else gives None and the Python parser (which says what is
 * wrong) takes the head line by line. Semantics stay in Python. */
static PyObject *
lex_head(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t max_head, max_line, max_field, max_fields;
    if (!PyArg_ParseTuple(args, "y*nnnn", &buf, &max_head, &max_line, &max_field, &max_fields))
        return NULL;
    const unsigned char *p = (const unsigned char *) buf.buf;
    Py_ssize_t len = buf.len, i = 0;
    PyObject *fields = NULL, *result = NULL;
    /* The request line: token SP target SP HTTP/1.d CRLF */
    Py_ssize_t m0 = 0;
    while (i < len && tchar[p[i]])
        i++;
    if (i == m0 || i >= len || p[i] != ' ')
        goto plain_none;
    Py_ssize_t m1 = i++, t0 = i;
    while (i < len && target_char[p[i]])
        i++;
    if (i == t0 || i >= len || p[i] != ' ')
        goto plain_none;
    Py_ssize_t t1 = i++;
    if (len - i < 10 || memcmp(p + i, "HTTP/1.", 7) != 0 || p[i + 7] < '0' || p[i + 7] > '9' || p[i + 8] != '\r' || p[i + 9] != '\n')
        goto plain_none;
    char minor = (char) p[i + 7];
    i += 10;
    if (i - 2 > max_line)
        goto plain_none;
    fields = PyList_New(0);
    if (fields == NULL)
        goto done;
    Py_ssize_t count = 0;
    for (;;) {
        if (i + 1 < len && p[i] == '\r' && p[i + 1] == '\n') {
            i += 2;
            break;  /* the end of the head */
        }
        Py_ssize_t n0 = i;
        while (i < len && tchar[p[i]])
            i++;
        if (i == n0 || i >= len || p[i] != ':')
            goto plain_none;
        Py_ssize_t n1 = i++;
        Py_ssize_t v0 = i;
        while (i < len && vchar[p[i]])
            i++;
        if (i + 1 >= len || p[i] != '\r' || p[i + 1] != '\n')
            goto plain_none;  /* a bare CR or LF, a control, or not all here yet */
        Py_ssize_t v1 = i;
        if (v1 - n0 > max_field || ++count > max_fields)
            goto plain_none;
        i += 2;
        while (v0 < v1 && (p[v0] == ' ' || p[v0] == '\t'))
            v0++;
        while (v1 > v0 && (p[v1 - 1] == ' ' || p[v1 - 1] == '\t'))
            v1--;
        PyObject *name = PyBytes_FromStringAndSize(NULL, n1 - n0);
        if (name == NULL)
            goto done;
        char *out = PyBytes_AS_STRING(name);
        for (Py_ssize_t k = n0; k < n1; k++)
            out[k - n0] = (char) ((p[k] >= 'A' && p[k] <= 'Z') ? p[k] + 32 : p[k]);
        PyObject *pair = Py_BuildValue("(Ny#)", name, (const char *) p + v0, v1 - v0);
        if (pair == NULL)
            goto done;
        int failed = PyList_Append(fields, pair);
        Py_DECREF(pair);
        if (failed)
            goto done;
    }
    if (i > max_head)
        goto plain_none;
    result = Py_BuildValue("(ny#y#cO)", i, (const char *) p + m0, m1 - m0, (const char *) p + t0, t1 - t0, minor, fields);
    goto done;
plain_none:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(fields);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"lex_head", lex_head, METH_VARARGS,
     "lex_head(data, max_head, max_line, max_field, max_fields) -> None | (end, method, target, minor, fields): "
     "a whole plain HTTP/1.x request head lexed, or None for the Python parser to take."},
    {"accept_read", accept_read, METH_VARARGS,
     "accept_read(listen_fd, size) -> None | (fd, bytes | None): accept4 (non-blocking, close-on-exec) "
     "and a first read of up to size bytes, in one call."},
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
    init_tables();
    return PyModule_Create(&module);
}
