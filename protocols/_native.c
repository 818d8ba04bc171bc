/* protocols._native: one multipart message in or out per call, in C.
 *
 * The bus's hot path sends and receives multipart messages of a few small frames
 * (routing identity, signature, header, body) and, at times, large tensor frames.
 * Through pyzmq each frame is a Python-level call that builds a Frame object, checks
 * flags and releases the GIL; here a whole message is one call:
 *
 *   recv(sock, flags, small)          -> [bytes x small, Msg, Msg, ...]
 *   recv_user(sock, flags, small)     -> (that list, User-Id of frame 1 or None)
 *   send(sock, parts, flags)          -> None
 *
 * ``sock`` is a pyzmq Socket: its ``underlying`` libzmq handle is used directly, with
 * the libzmq that pyzmq itself loaded (found among the process's shared objects with
 * dl_iterate_phdr and opened RTLD_NOLOAD: never a second copy).  Nothing is linked at
 * build time, so building needs only a C compiler and Python's headers.
 *
 * Frames past ``small`` come as ``Msg`` objects: a received zmq_msg_t kept as is,
 * exposing its bytes through the buffer protocol (zero-copy, read-only) and sent on
 * again by zmq_msg_copy (libzmq shares the content by reference count: forwarding a
 * megabyte frame copies nothing).  ``send`` takes bytes (copied: small frames), Msg
 * objects, and hands anything else (pyzmq Frames, numpy arrays, memoryviews) to the
 * ``fallback`` callable given to ``load`` (pyzmq's zero-copy send).
 *
 * Errors are raised as the ZMQError the ``error`` callable given to ``load`` builds from
 * an errno (zmq.Again for EAGAIN, ...).  A blocking receive releases the GIL while it
 * waits; everything else holds it (the calls return at once).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <string.h>

/* libzmq's ABI (zmq.h, stable since 4.0): a message is 64 opaque bytes. */
typedef struct {
    unsigned char _[64] __attribute__((aligned(sizeof(void *))));
} zmq_msg_t;

#define ZMQ_DONTWAIT 1
#define ZMQ_SNDMORE 2

static int (*z_msg_init)(zmq_msg_t *);
static int (*z_msg_init_size)(zmq_msg_t *, size_t);
static int (*z_msg_recv)(zmq_msg_t *, void *, int);
static int (*z_msg_send)(zmq_msg_t *, void *, int);
static void *(*z_msg_data)(zmq_msg_t *);
static size_t (*z_msg_size)(const zmq_msg_t *);
static int (*z_msg_more)(const zmq_msg_t *);
static int (*z_msg_close)(zmq_msg_t *);
static int (*z_msg_copy)(zmq_msg_t *, zmq_msg_t *);
static int (*z_msg_move)(zmq_msg_t *, zmq_msg_t *);
static const char *(*z_msg_gets)(const zmq_msg_t *, const char *);
static int (*z_errno)(void);
static void (*z_version)(int *, int *, int *);

static PyObject *error_factory;  /* errno -> the ZMQError to raise */
static PyObject *fallback_send;  /* (sock, part, flags) -> None, for other buffers */
static PyObject *underlying_str;
static int loaded;

/* -- errors ------------------------------------------------------------------------------ */

static PyObject *raise_zmq(int err) {
    PyObject *exc = PyObject_CallFunction(error_factory, "i", err);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static void *handle_of(PyObject *sock) {
    PyObject *h = PyObject_GetAttr(sock, underlying_str);
    if (h == NULL) return NULL;
    void *handle = PyLong_AsVoidPtr(h);
    Py_DECREF(h);
    if (handle == NULL && !PyErr_Occurred()) raise_zmq(ENOTSOCK); /* closed */
    return handle;
}

/* -- Msg: a received frame, zero-copy --------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    zmq_msg_t msg;
    int more;
} MsgObject;

static PyTypeObject MsgType;

static void Msg_dealloc(MsgObject *self) {
    z_msg_close(&self->msg);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Msg_getbuffer(MsgObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, z_msg_data(&self->msg),
                             (Py_ssize_t)z_msg_size(&self->msg), 1, flags);
}

static PyBufferProcs Msg_as_buffer = {(getbufferproc)Msg_getbuffer, NULL};

static Py_ssize_t Msg_len(MsgObject *self) { return (Py_ssize_t)z_msg_size(&self->msg); }

static PySequenceMethods Msg_as_sequence = {.sq_length = (lenfunc)Msg_len};

static PyObject *Msg_bytes(MsgObject *self, void *closure) {
    return PyBytes_FromStringAndSize(z_msg_data(&self->msg), (Py_ssize_t)z_msg_size(&self->msg));
}

static PyObject *Msg_buffer(MsgObject *self, void *closure) {
    return PyMemoryView_FromObject((PyObject *)self);
}

static PyObject *Msg_more(MsgObject *self, void *closure) { return PyBool_FromLong(self->more); }

static PyObject *Msg_get(MsgObject *self, PyObject *name) {
    const char *key = PyUnicode_AsUTF8(name);
    if (key == NULL) return NULL;
    const char *value = z_msg_gets(&self->msg, key);
    if (value == NULL) return raise_zmq(z_errno());
    return PyUnicode_DecodeUTF8(value, (Py_ssize_t)strlen(value), "replace");
}

static PyGetSetDef Msg_getset[] = {
    {"bytes", (getter)Msg_bytes, NULL, "the frame's bytes (a copy)", NULL},
    {"buffer", (getter)Msg_buffer, NULL, "a read-only memoryview of the frame (no copy)", NULL},
    {"more", (getter)Msg_more, NULL, "more frames of the message follow", NULL},
    {NULL},
};

static PyMethodDef Msg_methods[] = {
    {"get", (PyCFunction)Msg_get, METH_O, "a metadata property of the frame (e.g. 'User-Id')"},
    {NULL},
};

static PyTypeObject MsgType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "protocols._native.Msg",
    .tp_doc = "A received ZeroMQ frame, kept without a copy (buffer protocol, .bytes, .buffer).",
    .tp_basicsize = sizeof(MsgObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Msg_dealloc,
    .tp_as_buffer = &Msg_as_buffer,
    .tp_as_sequence = &Msg_as_sequence,
    .tp_getset = Msg_getset,
    .tp_methods = Msg_methods,
};

/* -- receiving --------------------------------------------------------------------------- */

/* Receive one frame into ``msg`` (initialised here).  Returns 0, or -1 with an exception
 * set.  Blocking receives release the GIL; EINTR runs the signal handlers and retries. */
static int recv_one(zmq_msg_t *msg, void *handle, int flags) {
    z_msg_init(msg);
    /* A busy socket has a message waiting: take it without giving up the GIL (which
     * another thread could hold for a while); wait without it only when there is none. */
    if (!(flags & ZMQ_DONTWAIT)) {
        if (z_msg_recv(msg, handle, flags | ZMQ_DONTWAIT) >= 0) return 0;
        int err = z_errno();
        if (err != EAGAIN && err != EINTR) {
            raise_zmq(err);
            z_msg_close(msg);
            return -1;
        }
    }
    for (;;) {
        int rc;
        if (flags & ZMQ_DONTWAIT) {
            rc = z_msg_recv(msg, handle, flags);
        } else {
            Py_BEGIN_ALLOW_THREADS
            rc = z_msg_recv(msg, handle, flags);
            Py_END_ALLOW_THREADS
        }
        if (rc >= 0) return 0;
        int err = z_errno();
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) break;
            continue;
        }
        raise_zmq(err);
        break;
    }
    z_msg_close(msg);
    return -1;
}

/* After a failure mid-message: read and drop its remaining frames, so that the next
 * receive starts at a message boundary. */
static void drain(void *handle) {
    zmq_msg_t msg;
    int more = 1;
    while (more) {
        z_msg_init(&msg);
        if (z_msg_recv(&msg, handle, ZMQ_DONTWAIT) < 0) more = 0;
        else more = z_msg_more(&msg);
        z_msg_close(&msg);
    }
}

static PyObject *recv_message(void *handle, int flags, Py_ssize_t small, PyObject **user_id) {
    zmq_msg_t msg;
    if (recv_one(&msg, handle, flags) < 0) return NULL;
    int more = z_msg_more(&msg);
    PyObject *parts = PyList_New(0);
    if (parts == NULL) {
        z_msg_close(&msg);
        goto fail;
    }
    for (Py_ssize_t i = 0;; i++) {
        more = z_msg_more(&msg);
        PyObject *item;
        if (user_id != NULL && i == 1 && *user_id == NULL) {
            const char *uid = z_msg_gets(&msg, "User-Id");
            if (uid != NULL) *user_id = PyUnicode_DecodeUTF8(uid, (Py_ssize_t)strlen(uid), "replace");
            PyErr_Clear();
        }
        if (i < small) {
            item = PyBytes_FromStringAndSize(z_msg_data(&msg), (Py_ssize_t)z_msg_size(&msg));
            z_msg_close(&msg);
        } else {
            MsgObject *m = PyObject_New(MsgObject, &MsgType);
            if (m != NULL) {
                z_msg_init(&m->msg);
                z_msg_move(&m->msg, &msg); /* (leaves ``msg`` empty: nothing to close) */
                m->more = more;
            } else {
                z_msg_close(&msg);
            }
            item = (PyObject *)m;
        }
        if (item == NULL || PyList_Append(parts, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
        if (!more) return parts;
        /* the rest of a multipart message is there already: never waits */
        if (recv_one(&msg, handle, ZMQ_DONTWAIT) < 0) {
            more = 0; /* (libzmq delivers a message whole: this is not EAGAIN) */
            goto fail;
        }
    }
fail:
    if (more) drain(handle);
    Py_XDECREF(parts);
    return NULL;
}

static int parse_recv_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, void **handle, int *flags,
                           Py_ssize_t *small) {
    PyObject *values[3] = {NULL, NULL, NULL};
    static const char *names[3] = {"sock", "flags", "small"};
    if (nargs > 3) goto usage;
    for (Py_ssize_t i = 0; i < nargs; i++) values[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        const char *key = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, k));
        int found = 0;
        for (int i = 0; key != NULL && i < 3; i++) {
            if (strcmp(key, names[i]) == 0 && values[i] == NULL) {
                values[i] = args[nargs + k];
                found = 1;
            }
        }
        if (!found) goto usage;
    }
    if (values[0] == NULL) goto usage;
    *flags = 0;
    *small = 4;
    if (values[1] != NULL) {
        *flags = (int)PyLong_AsLong(values[1]);
        if (*flags == -1 && PyErr_Occurred()) return -1;
    }
    if (values[2] != NULL) {
        *small = PyLong_AsSsize_t(values[2]);
        if (*small == -1 && PyErr_Occurred()) return -1;
    }
    *handle = handle_of(values[0]);
    return *handle == NULL ? -1 : 0;
usage:
    PyErr_SetString(PyExc_TypeError, "expected (sock, flags=0, small=4)");
    return -1;
}

static PyObject *native_recv(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    void *handle;
    int flags;
    Py_ssize_t small;
    if (parse_recv_args(args, nargs, kwnames, &handle, &flags, &small) < 0) return NULL;
    return recv_message(handle, flags, small, NULL);
}

static PyObject *native_recv_user(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    void *handle;
    int flags;
    Py_ssize_t small;
    if (parse_recv_args(args, nargs, kwnames, &handle, &flags, &small) < 0) return NULL;
    PyObject *user_id = NULL;
    PyObject *parts = recv_message(handle, flags, small, &user_id);
    if (parts == NULL) {
        Py_XDECREF(user_id);
        return NULL;
    }
    if (user_id == NULL) {
        user_id = Py_None;
        Py_INCREF(user_id);
    }
    PyObject *result = PyTuple_Pack(2, parts, user_id);
    Py_DECREF(parts);
    Py_DECREF(user_id);
    return result;
}

/* -- sending ----------------------------------------------------------------------------- */

static int send_part(PyObject *sock, void *handle, PyObject *part, int flags) {
    zmq_msg_t msg;
    if (PyBytes_CheckExact(part)) {
        Py_ssize_t n = PyBytes_GET_SIZE(part);
        if (z_msg_init_size(&msg, (size_t)n) < 0) {
            raise_zmq(z_errno());
            return -1;
        }
        memcpy(z_msg_data(&msg), PyBytes_AS_STRING(part), (size_t)n);
    } else if (Py_IS_TYPE(part, &MsgType)) {
        z_msg_init(&msg);
        if (z_msg_copy(&msg, &((MsgObject *)part)->msg) < 0) {
            raise_zmq(z_errno());
            z_msg_close(&msg);
            return -1;
        }
    } else {
        PyObject *r = PyObject_CallFunction(fallback_send, "OOi", sock, part, flags);
        if (r == NULL) return -1;
        Py_DECREF(r);
        return 0;
    }
    for (;;) {
        if (z_msg_send(&msg, handle, flags) >= 0) return 0;
        int err = z_errno();
        if (err == EINTR && (flags & ZMQ_DONTWAIT) == 0) {
            if (PyErr_CheckSignals() < 0) break;
            continue;
        }
        raise_zmq(err);
        break;
    }
    z_msg_close(&msg);
    return -1;
}

static PyObject *native_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (nargs < 2 || nargs > 3 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0)) {
        PyErr_SetString(PyExc_TypeError, "send(sock, parts, flags=0)");
        return NULL;
    }
    int flags = 0;
    if (nargs > 2) {
        flags = (int)PyLong_AsLong(args[2]);
        if (flags == -1 && PyErr_Occurred()) return NULL;
    }
    PyObject *seq = PySequence_Fast(args[1], "parts must be a sequence of frames");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n == 0) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "a message needs at least one frame");
        return NULL;
    }
    void *handle = handle_of(args[0]);
    if (handle == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    /* Only the first frame can fail for want of room (or an unroutable identity on a
     * mandatory ROUTER): once it is in, libzmq takes the rest of the message at once. */
    for (Py_ssize_t i = 0; i < n; i++) {
        int f = (i == 0 ? flags : 0) | (i < n - 1 ? ZMQ_SNDMORE : 0);
        if (send_part(args[0], handle, items[i], f) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* -- loading ----------------------------------------------------------------------------- */

static int find_libzmq(struct dl_phdr_info *info, size_t size, void *data) {
    const char *name = info->dlpi_name;
    const char *base = name ? strrchr(name, '/') : NULL;
    base = base ? base + 1 : name;
    if (base != NULL && strncmp(base, "libzmq", 6) == 0) {
        void *lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
        if (lib != NULL) {
            *(void **)data = lib;
            return 1;
        }
    }
    return 0;
}

#define LOOKUP(var, sym)                                                   \
    do {                                                                   \
        *(void **)(&var) = dlsym(lib, sym);                                \
        if (var == NULL) {                                                 \
            PyErr_Format(PyExc_ImportError, "libzmq has no symbol %s", sym); \
            return NULL;                                                   \
        }                                                                  \
    } while (0)

static PyObject *native_load(PyObject *module, PyObject *args) {
    PyObject *error, *fallback;
    if (!PyArg_ParseTuple(args, "OO:load", &error, &fallback)) return NULL;
    void *lib = NULL;
    dl_iterate_phdr(find_libzmq, &lib);
    if (lib == NULL) {
        /* pyzmq linked into its own extension, or a libzmq loaded under another name */
        lib = dlopen(NULL, RTLD_NOW);
        if (lib == NULL || dlsym(lib, "zmq_msg_recv") == NULL) {
            PyErr_SetString(PyExc_ImportError, "the libzmq pyzmq uses is not among the loaded shared objects");
            return NULL;
        }
    }
    LOOKUP(z_version, "zmq_version");
    int major, minor, patch;
    z_version(&major, &minor, &patch);
    if (major != 4) {
        PyErr_Format(PyExc_ImportError, "libzmq %d.%d.%d: built for the 4.x ABI", major, minor, patch);
        return NULL;
    }
    LOOKUP(z_msg_init, "zmq_msg_init");
    LOOKUP(z_msg_init_size, "zmq_msg_init_size");
    LOOKUP(z_msg_recv, "zmq_msg_recv");
    LOOKUP(z_msg_send, "zmq_msg_send");
    LOOKUP(z_msg_data, "zmq_msg_data");
    LOOKUP(z_msg_size, "zmq_msg_size");
    LOOKUP(z_msg_more, "zmq_msg_more");
    LOOKUP(z_msg_close, "zmq_msg_close");
    LOOKUP(z_msg_copy, "zmq_msg_copy");
    LOOKUP(z_msg_move, "zmq_msg_move");
    LOOKUP(z_msg_gets, "zmq_msg_gets");
    LOOKUP(z_errno, "zmq_errno");
    Py_XSETREF(error_factory, Py_NewRef(error));
    Py_XSETREF(fallback_send, Py_NewRef(fallback));
    loaded = 1;
    return Py_BuildValue("(iii)", major, minor, patch);
}

typedef PyObject *(*fastcall_kw)(PyObject *, PyObject *const *, Py_ssize_t, PyObject *);

static PyObject *guard(fastcall_kw fn, PyObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kw) {
    if (!loaded) {
        PyErr_SetString(PyExc_RuntimeError, "protocols._native.load() was not called");
        return NULL;
    }
    return fn(m, args, nargs, kw);
}

static PyObject *g_recv(PyObject *m, PyObject *const *a, Py_ssize_t n, PyObject *k) {
    return guard(native_recv, m, a, n, k);
}
static PyObject *g_recv_user(PyObject *m, PyObject *const *a, Py_ssize_t n, PyObject *k) {
    return guard(native_recv_user, m, a, n, k);
}
static PyObject *g_send(PyObject *m, PyObject *const *a, Py_ssize_t n, PyObject *k) {
    return guard(native_send, m, a, n, k);
}

static PyMethodDef methods[] = {
    {"load", native_load, METH_VARARGS,
     "load(error, fallback) -> libzmq's version: bind to the libzmq pyzmq loaded."},
    {"recv", (PyCFunction)(void (*)(void))g_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv(sock, flags=0, small=4) -> frames: one multipart message."},
    {"recv_user", (PyCFunction)(void (*)(void))g_recv_user, METH_FASTCALL | METH_KEYWORDS,
     "recv_user(sock, flags=0, small=4) -> (frames, User-Id of frame 1 or None)."},
    {"send", (PyCFunction)(void (*)(void))g_send, METH_FASTCALL | METH_KEYWORDS,
     "send(sock, parts, flags=0): one multipart message."},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "protocols._native", "Multipart ZeroMQ messages in one call (see _native.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&MsgType) < 0) return NULL;
    underlying_str = PyUnicode_InternFromString("underlying");
    if (underlying_str == NULL) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    Py_INCREF(&MsgType);
    if (PyModule_AddObject(m, "Msg", (PyObject *)&MsgType) < 0) {
        Py_DECREF(&MsgType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
