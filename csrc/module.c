/*
 * module.c - the Python module aqlm._C: the only file that speaks the CPython and NumPy C API.
 *
 * Binding functions only handle arguments: they check every shape, dtype and layout and raise
 * TypeError / ValueError naming the parameter, then release the GIL around one call into the
 * core. Inputs are taken zero-copy when C-contiguous (copied once otherwise, never converted to
 * another dtype); outputs and codes are rejected, not converted, when their layout or dtype is
 * wrong. NumPy has no bfloat16, so bfloat16 arrays travel as int16/uint16 bit patterns and every
 * float argument names its dtype explicitly ("float32", "float16" or "bfloat16").
 * One exception to checking at every call: bind_matmul checks a few-token kernel call once, and
 * run_bound_matmul then takes the data addresses of x and out from aqlm.ops (its only caller,
 * which guarantees their sizes and lifetimes), checking only that they are nonzero and that out
 * overlaps neither x nor the weight.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_23_API_VERSION
#include <numpy/arrayobject.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "aqlm.h"
#include "internal.h"

typedef struct {
    aqlm_simd supported; /* what the CPU, the OS and this build support */
    aqlm_simd chosen;    /* the default: AQLM_SIMD (if set) or `supported` */
} module_state;

static module_state *state_of(PyObject *module) { return (module_state *)PyModule_GetState(module); }

/* ---- errors ---------------------------------------------------------------------------------- */

static PyObject *raise_status(aqlm_status status, const aqlm_error *err) {
    switch (status) {
    case AQLM_ERR_NOMEM: PyErr_SetString(PyExc_MemoryError, err->message); break;
    case AQLM_ERR_INTERRUPTED:
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyboardInterrupt, err->message);
        break;
    default: PyErr_SetString(PyExc_ValueError, err->message); break;
    }
    return NULL;
}

/* What a binding returns after a kernel that writes its outputs in place: None, or NULL with
 * the kernel's error raised. */
static PyObject *none_or_raise(aqlm_status status, const aqlm_error *err) {
    if (status != AQLM_OK) return raise_status(status, err);
    Py_RETURN_NONE;
}

/* ---- dtypes and arrays ----------------------------------------------------------------------- */

static int parse_float_dtype(const char *name, const char *what, aqlm_dtype *dtype) {
    if (strcmp(name, "float32") == 0) *dtype = AQLM_F32;
    else if (strcmp(name, "float16") == 0) *dtype = AQLM_F16;
    else if (strcmp(name, "bfloat16") == 0) *dtype = AQLM_BF16;
    else {
        PyErr_Format(PyExc_ValueError, "%s must be 'float32', 'float16' or 'bfloat16', got '%s'", what, name);
        return -1;
    }
    return 0;
}

static const char *dtype_label(aqlm_dtype dtype) {
    return dtype == AQLM_F32 ? "float32" : dtype == AQLM_F16 ? "float16" : "bfloat16 (as int16/uint16 bits)";
}

static int array_matches_dtype(PyArrayObject *array, aqlm_dtype dtype) {
    const int type = PyArray_TYPE(array);
    if (dtype == AQLM_F32) return type == NPY_FLOAT32;
    if (dtype == AQLM_F16) return type == NPY_FLOAT16;
    return type == NPY_INT16 || type == NPY_UINT16;
}

/* A C-contiguous view of a float input of the named dtype and ndim (copied only if strided). */
static PyArrayObject *float_input(PyObject *object, const char *name, aqlm_dtype dtype, int ndim) {
    if (!PyArray_Check(object)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name, Py_TYPE(object)->tp_name);
        return NULL;
    }
    PyArrayObject *given = (PyArrayObject *)object;
    if (!array_matches_dtype(given, dtype)) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s, got %s", name, dtype_label(dtype),
                     PyArray_DESCR(given)->typeobj->tp_name);
        return NULL;
    }
    if (ndim >= 0 && PyArray_NDIM(given) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", name, ndim, PyArray_NDIM(given));
        return NULL;
    }
    return (PyArrayObject *)PyArray_FROM_OF(object, NPY_ARRAY_CARRAY_RO);
}

/* Codes: int8 or int16, 3-D, C-contiguous; never copied or converted. */
static PyArrayObject *codes_input(PyObject *object) {
    if (!PyArray_Check(object)) {
        PyErr_Format(PyExc_TypeError, "codes must be a numpy.ndarray, got %s", Py_TYPE(object)->tp_name);
        return NULL;
    }
    PyArrayObject *codes = (PyArrayObject *)object;
    const int type = PyArray_TYPE(codes);
    if (type != NPY_INT8 && type != NPY_INT16) {
        PyErr_Format(PyExc_TypeError, "codes must have dtype int8 or int16, got %s",
                     PyArray_DESCR(codes)->typeobj->tp_name);
        return NULL;
    }
    if (PyArray_NDIM(codes) != 3) {
        PyErr_Format(PyExc_ValueError,
                     "codes must have 3 dimensions [num_out_groups, num_in_groups, num_codebooks], got %d",
                     PyArray_NDIM(codes));
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(codes)) {
        PyErr_SetString(PyExc_ValueError, "codes must be C-contiguous");
        return NULL;
    }
    Py_INCREF(codes);
    return codes;
}

/* An output: exactly the dtype, shape [rows, columns], C-contiguous and writeable. */
static int check_output(PyObject *object, const char *name, aqlm_dtype dtype, npy_intp rows, npy_intp columns) {
    if (!PyArray_Check(object)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name, Py_TYPE(object)->tp_name);
        return -1;
    }
    PyArrayObject *out = (PyArrayObject *)object;
    if (!array_matches_dtype(out, dtype)) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s, got %s", name, dtype_label(dtype),
                     PyArray_DESCR(out)->typeobj->tp_name);
        return -1;
    }
    if (PyArray_NDIM(out) != 2 || PyArray_DIM(out, 0) != rows || PyArray_DIM(out, 1) != columns) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%zd, %zd)", name, (Py_ssize_t)rows, (Py_ssize_t)columns);
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(out) || !PyArray_ISWRITEABLE(out)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and writeable", name);
        return -1;
    }
    return 0;
}

/* Rejects an output whose bytes overlap an input's: the kernels read inputs after writing outputs.
 * Both arrays are C-contiguous here, so their bytes are [data, data + nbytes). */
static int check_no_overlap(PyObject *out, const char *out_name, PyArrayObject *input, const char *input_name) {
    if (input == NULL) return 0;
    const char *out_first = PyArray_BYTES((PyArrayObject *)out), *in_first = PyArray_BYTES(input);
    const char *out_end = out_first + PyArray_NBYTES((PyArrayObject *)out), *in_end = in_first + PyArray_NBYTES(input);
    if (out_first < in_end && in_first < out_end) {
        PyErr_Format(PyExc_ValueError, "%s must not overlap %s in memory", out_name, input_name);
        return -1;
    }
    return 0;
}

static int parse_simd(PyObject *module, const char *name, aqlm_simd *level) {
    const module_state *state = state_of(module);
    if (name == NULL) {
        *level = state->chosen;
        return 0;
    }
    aqlm_error err;
    if (aqlm_simd_parse(name, level, &err) != AQLM_OK) {
        PyErr_SetString(PyExc_ValueError, err.message);
        return -1;
    }
    if (*level > state->supported) {
        PyErr_Format(PyExc_ValueError, "simd='%s' is not available: this CPU and build support up to '%s'",
                     name, aqlm_simd_name(state->supported));
        return -1;
    }
    return 0;
}

static int check_threads(int num_threads) {
    if (num_threads < 1) {
        PyErr_Format(PyExc_ValueError, "num_threads must be >= 1, got %d", num_threads);
        return -1;
    }
    return 0;
}

/* ---- the quantized weight: codes, codebooks, scales, bias ------------------------------------ */

/* log2 of a codebook size K that is a power of two in [2, 2**max_bits]; -1 otherwise. */
static int codebook_bits(npy_intp K, int max_bits) {
    int nbits = 1;
    while (nbits <= max_bits && ((npy_intp)1 << nbits) < K) nbits++;
    return nbits <= max_bits && ((npy_intp)1 << nbits) == K ? nbits : -1;
}

typedef struct {
    PyArrayObject *codes, *codebooks, *scales, *bias;
    aqlm_format format;
    aqlm_dtype param_dtype;
} weight_args;

static void weight_args_release(weight_args *w) {
    Py_XDECREF(w->codes);
    Py_XDECREF(w->codebooks);
    Py_XDECREF(w->scales);
    Py_XDECREF(w->bias);
}

/* Checks codes [OG, G, M], codebooks [M, K, og, ig], scales (OG elements), bias (None or OG*og)
 * against each other and fills the format. */
static int weight_args_parse(weight_args *w, PyObject *codes, PyObject *codebooks, PyObject *scales,
                             PyObject *bias, const char *param_dtype) {
    memset(w, 0, sizeof *w);
    if (parse_float_dtype(param_dtype, "param_dtype", &w->param_dtype) < 0) return -1;
    if (!(w->codes = codes_input(codes))) return -1;
    if (!(w->codebooks = float_input(codebooks, "codebooks", w->param_dtype, 4))) return -1;
    if (!(w->scales = float_input(scales, "scales", w->param_dtype, -1))) return -1;
    if (bias != Py_None && !(w->bias = float_input(bias, "bias", w->param_dtype, 1))) return -1;

    const npy_intp *cs = PyArray_DIMS(w->codes), *bs = PyArray_DIMS(w->codebooks);
    const npy_intp M = bs[0], K = bs[1], og = bs[2], ig = bs[3];
    if (cs[2] != M) {
        PyErr_Format(PyExc_ValueError, "codes have %zd codebooks (shape[2]) but codebooks have %zd (shape[0])",
                     (Py_ssize_t)cs[2], (Py_ssize_t)M);
        return -1;
    }
    const int nbits = codebook_bits(K, 16);
    if (nbits < 0) {
        PyErr_Format(PyExc_ValueError, "codebook size (codebooks.shape[1]) must be a power of two in [2, 65536], got %zd",
                     (Py_ssize_t)K);
        return -1;
    }
    const int code_bits = PyArray_TYPE(w->codes) == NPY_INT8 ? 8 : 16;
    if (code_bits != (nbits <= 8 ? 8 : 16)) {
        PyErr_Format(PyExc_TypeError, "codes for %zd-entry codebooks must be int%d, got int%d", (Py_ssize_t)K,
                     nbits <= 8 ? 8 : 16, code_bits);
        return -1;
    }
    if (PyArray_SIZE(w->scales) != cs[0]) {
        PyErr_Format(PyExc_ValueError, "scales must have one value per output group (%zd), got %zd values",
                     (Py_ssize_t)cs[0], (Py_ssize_t)PyArray_SIZE(w->scales));
        return -1;
    }
    if (w->bias && PyArray_DIM(w->bias, 0) != cs[0] * og) {
        PyErr_Format(PyExc_ValueError, "bias must have out_features=%zd values, got %zd", (Py_ssize_t)(cs[0] * og),
                     (Py_ssize_t)PyArray_DIM(w->bias, 0));
        return -1;
    }
    w->format.out_features = cs[0] * og;
    w->format.in_features = cs[1] * ig;
    w->format.out_group_size = og;
    w->format.in_group_size = ig;
    w->format.num_codebooks = M;
    w->format.nbits = nbits;
    w->format.code_bits = code_bits;
    aqlm_error err;
    if (aqlm_format_check(&w->format, &err) != AQLM_OK) {
        PyErr_SetString(PyExc_ValueError, err.message);
        return -1;
    }
    return 0;
}

/* Rejects an output that overlaps any weight tensor. */
static int check_weight_not_overlapped(PyObject *out, const char *out_name, const weight_args *w) {
    return check_no_overlap(out, out_name, w->codes, "codes") < 0 ||
                   check_no_overlap(out, out_name, w->codebooks, "codebooks") < 0 ||
                   check_no_overlap(out, out_name, w->scales, "scales") < 0 ||
                   check_no_overlap(out, out_name, w->bias, "bias") < 0
               ? -1
               : 0;
}

/* ---- functions ------------------------------------------------------------------------------- */

PyDoc_STRVAR(dequantize_doc,
"dequantize(codes, codebooks, scales, out, *, param_dtype='float32', out_dtype='float32', simd=None, num_threads=None)\n"
"--\n\n"
"Writes the dense weight [out_features, in_features] into `out`.\n"
"codes [num_out_groups, num_in_groups, num_codebooks] int8/int16; codebooks\n"
"[num_codebooks, 2**nbits, out_group_size, in_group_size]; scales: one value per output group.");

static PyObject *py_dequantize(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"codes", "codebooks", "scales", "out", "param_dtype", "out_dtype", "simd", "num_threads", NULL};
    PyObject *codes, *codebooks, *scales, *out;
    const char *param_dtype = "float32", *out_dtype_name = "float32", *simd_name = NULL;
    int num_threads = omp_get_max_threads();
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|$sszi:dequantize", keywords, &codes, &codebooks, &scales,
                                     &out, &param_dtype, &out_dtype_name, &simd_name, &num_threads))
        return NULL;
    weight_args w;
    aqlm_dtype out_dtype;
    aqlm_simd simd;
    if (weight_args_parse(&w, codes, codebooks, scales, Py_None, param_dtype) < 0 ||
        parse_float_dtype(out_dtype_name, "out_dtype", &out_dtype) < 0 || parse_simd(module, simd_name, &simd) < 0 ||
        check_threads(num_threads) < 0 ||
        check_output(out, "out", out_dtype, (npy_intp)w.format.out_features, (npy_intp)w.format.in_features) < 0 ||
        check_weight_not_overlapped(out, "out", &w) < 0) {
        weight_args_release(&w);
        return NULL;
    }
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = aqlm_dequantize(&w.format, PyArray_DATA(w.codes), w.param_dtype, PyArray_DATA(w.codebooks),
                             PyArray_DATA(w.scales), out_dtype, PyArray_DATA((PyArrayObject *)out), simd,
                             num_threads, &err);
    Py_END_ALLOW_THREADS
    weight_args_release(&w);
    return none_or_raise(status, &err);
}

typedef aqlm_status (*matmul_fn)(const aqlm_format *, int64_t, aqlm_dtype, const void *, const void *, aqlm_dtype,
                                 const void *, const void *, const void *, void *, aqlm_simd, int, aqlm_error *);

/* The arguments of the kernels that read the codes as stored (lut, codebook, bf16), converted and
 * checked against x [n, in_features] and out [n, out_features]: 0 (then release w and x), or -1
 * with an exception set and nothing held. */
static int codes_matmul_parse(PyObject *module, weight_args *w, PyArrayObject **x, PyObject *x_object,
                              PyObject *codes, PyObject *codebooks, PyObject *scales, PyObject *bias, PyObject *out,
                              const char *x_dtype_name, const char *param_dtype, const char *simd_name,
                              int num_threads, aqlm_dtype *x_dtype, aqlm_simd *simd) {
    *x = NULL;
    if (weight_args_parse(w, codes, codebooks, scales, bias, param_dtype) < 0 ||
        parse_float_dtype(x_dtype_name, "x_dtype", x_dtype) < 0 || parse_simd(module, simd_name, simd) < 0 ||
        check_threads(num_threads) < 0 || !(*x = float_input(x_object, "x", *x_dtype, 2)))
        goto fail;
    if (PyArray_DIM(*x, 1) != w->format.in_features) {
        PyErr_Format(PyExc_ValueError, "x has %zd features (shape[1]) but the weight has in_features=%lld",
                     (Py_ssize_t)PyArray_DIM(*x, 1), (long long)w->format.in_features);
        goto fail;
    }
    if (check_output(out, "out", *x_dtype, PyArray_DIM(*x, 0), (npy_intp)w->format.out_features) < 0 ||
        check_no_overlap(out, "out", *x, "x") < 0 || check_weight_not_overlapped(out, "out", w) < 0)
        goto fail;
    return 0;
fail:
    weight_args_release(w);
    Py_XDECREF(*x);
    *x = NULL;
    return -1;
}

static PyObject *matmul_common(PyObject *module, PyObject *args, PyObject *kwargs, const char *format_string,
                               matmul_fn fn) {
    static char *keywords[] = {"x", "codes", "codebooks", "scales", "bias", "out", "x_dtype", "param_dtype", "simd",
                               "num_threads", NULL};
    PyObject *x_object, *codes, *codebooks, *scales, *bias, *out;
    const char *x_dtype_name = "float32", *param_dtype = "float32", *simd_name = NULL;
    int num_threads = omp_get_max_threads();
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format_string, keywords, &x_object, &codes, &codebooks, &scales,
                                     &bias, &out, &x_dtype_name, &param_dtype, &simd_name, &num_threads))
        return NULL;
    weight_args w;
    aqlm_dtype x_dtype;
    aqlm_simd simd;
    PyArrayObject *x;
    if (codes_matmul_parse(module, &w, &x, x_object, codes, codebooks, scales, bias, out, x_dtype_name, param_dtype,
                           simd_name, num_threads, &x_dtype, &simd) < 0)
        return NULL;
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = fn(&w.format, PyArray_DIM(x, 0), x_dtype, PyArray_DATA(x), PyArray_DATA(w.codes), w.param_dtype,
                PyArray_DATA(w.codebooks), PyArray_DATA(w.scales), w.bias ? PyArray_DATA(w.bias) : NULL,
                PyArray_DATA((PyArrayObject *)out), simd, num_threads, &err);
    Py_END_ALLOW_THREADS
    weight_args_release(&w);
    Py_DECREF(x);
    return none_or_raise(status, &err);
}

PyDoc_STRVAR(lut_matmul_doc,
"lut_matmul(x, codes, codebooks, scales, bias, out, *, x_dtype='float32', param_dtype='float32', simd=None, num_threads=None)\n"
"--\n\n"
"out [n, out_features] = x [n, in_features] @ W.T + bias, by per-token lookup tables.\n"
"Needs codebooks of at most 256 codewords. bias may be None.");

static PyObject *py_lut_matmul(PyObject *module, PyObject *args, PyObject *kwargs) {
    return matmul_common(module, args, kwargs, "OOOOOO|$sszi:lut_matmul", aqlm_lut_matmul);
}

PyDoc_STRVAR(codebook_matmul_doc,
"codebook_matmul(x, codes, codebooks, scales, bias, out, *, x_dtype='float32', param_dtype='float32', simd=None, num_threads=None)\n"
"--\n\n"
"out [n, out_features] = x [n, in_features] @ W.T + bias, decoding codewords straight from the\n"
"codebooks (any codebook size; meant for few tokens). bias may be None.");

static PyObject *py_codebook_matmul(PyObject *module, PyObject *args, PyObject *kwargs) {
    return matmul_common(module, args, kwargs, "OOOOOO|$sszi:codebook_matmul", aqlm_codebook_matmul);
}


/* ---- quantized lookup tables ------------------------------------------------------------------ */

/* packed: uint8, 1-D, C-contiguous, exactly aqlm_lutq_packed_size(format) bytes. */
static int check_packed(PyObject *object, const aqlm_format *format, int writeable) {
    if (!PyArray_Check(object) || PyArray_TYPE((PyArrayObject *)object) != NPY_UINT8) {
        PyErr_SetString(PyExc_TypeError, "packed must be a numpy.ndarray of dtype uint8");
        return -1;
    }
    PyArrayObject *packed = (PyArrayObject *)object;
    const npy_intp expected = (npy_intp)aqlm_lutq_packed_size(format);
    if (PyArray_NDIM(packed) != 1 || PyArray_DIM(packed, 0) != expected) {
        PyErr_Format(PyExc_ValueError, "packed must have shape (%zd,) for this weight, got %d dimensions of size %zd",
                     (Py_ssize_t)expected, PyArray_NDIM(packed), (Py_ssize_t)PyArray_SIZE(packed));
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(packed) || (writeable && !PyArray_ISWRITEABLE(packed))) {
        PyErr_Format(PyExc_ValueError, "packed must be C-contiguous%s", writeable ? " and writeable" : "");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(lutq_pack_codes_doc,
"lutq_pack_codes(codes, codebooks, scales, packed, *, param_dtype='float32')\n"
"--\n\n"
"Repacks int8 codes (nbits <= 8, out_group_size 1) into `packed` (uint8, lutq_packed_size(...)\n"
"bytes) for lutq_matmul: tiles of 64 output rows whose codes for one group and codebook are adjacent.");

static PyObject *py_lutq_pack_codes(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"codes", "codebooks", "scales", "packed", "param_dtype", NULL};
    PyObject *codes, *codebooks, *scales, *packed;
    const char *param_dtype = "float32";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|$s:lutq_pack_codes", keywords, &codes, &codebooks, &scales,
                                     &packed, &param_dtype))
        return NULL;
    weight_args w;
    if (weight_args_parse(&w, codes, codebooks, scales, Py_None, param_dtype) < 0) goto fail;
    aqlm_error err;
    aqlm_status status = aqlm_codes_check(&w.format, PyArray_DATA(w.codes), &err);
    if (status == AQLM_OK && check_packed(packed, &w.format, 1) < 0) goto fail;
    if (status == AQLM_OK) {
        Py_BEGIN_ALLOW_THREADS
        status = aqlm_lutq_pack_codes(&w.format, PyArray_DATA(w.codes), PyArray_DATA((PyArrayObject *)packed), &err);
        Py_END_ALLOW_THREADS
    }
    weight_args_release(&w);
    return none_or_raise(status, &err);
fail:
    weight_args_release(&w);
    return NULL;
}

PyDoc_STRVAR(lutq_packed_size_doc,
"lutq_packed_size(out_features, in_features, in_group_size, num_codebooks, nbits)\n--\n\n"
"Bytes of the packed codes of a weight for lutq_matmul.");

static PyObject *py_lutq_packed_size(PyObject *module, PyObject *args) {
    long long out, in, ig, M;
    int nbits;
    if (!PyArg_ParseTuple(args, "LLLLi:lutq_packed_size", &out, &in, &ig, &M, &nbits)) return NULL;
    aqlm_format format = {out, in, 1, ig, M, nbits, 8};
    aqlm_error err;
    if (aqlm_format_check(&format, &err) != AQLM_OK) return raise_status(AQLM_ERR_ARGUMENT, &err);
    return PyLong_FromSize_t(aqlm_lutq_packed_size(&format));
}

/* prepared: a C-contiguous 1-D array of `size` values of NumPy type `type` (named type_name),
 * made by the function named `maker` from these codebooks. */
static int check_prepared_array(PyObject *object, int type, const char *type_name, size_t size, const char *maker) {
    if (!PyArray_Check(object) || PyArray_TYPE((PyArrayObject *)object) != type ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)object) || PyArray_NDIM((PyArrayObject *)object) != 1 ||
        (size_t)PyArray_DIM((PyArrayObject *)object, 0) != size) {
        PyErr_Format(PyExc_ValueError, "prepared must be a C-contiguous 1-D %s array of %zu values (from %s of these "
                                       "codebooks)", type_name, size, maker);
        return -1;
    }
    return 0;
}

/* prepared: float32, of aqlm_lutq_prepared_size(format) values. */
static int check_prepared(PyObject *object, const aqlm_format *format) {
    return check_prepared_array(object, NPY_FLOAT32, "float32", aqlm_lutq_prepared_size(format),
                                "lutq_prepare_codebooks");
}

/* What a codebook preparation writes into a new array of its prepared values. */
typedef aqlm_status (*prepare_fn)(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks, void *prepared,
                                  aqlm_error *err);

/* A new 1-D array of `size` values of NumPy type `type` filled by `prepare` from codebooks (whose
 * reference this takes) in the shape of `format`, or NULL with an exception set. */
static PyObject *new_prepared(PyArrayObject *codebooks, const aqlm_format *format, aqlm_dtype param_dtype, int type,
                              npy_intp size, prepare_fn prepare) {
    aqlm_error err;
    if (aqlm_format_check(format, &err) != AQLM_OK) {
        Py_DECREF(codebooks);
        return raise_status(AQLM_ERR_ARGUMENT, &err);
    }
    PyObject *prepared = PyArray_SimpleNew(1, &size, type);
    if (prepared == NULL) {
        Py_DECREF(codebooks);
        return NULL;
    }
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = prepare(format, param_dtype, PyArray_DATA(codebooks), PyArray_DATA((PyArrayObject *)prepared), &err);
    Py_END_ALLOW_THREADS
    Py_DECREF(codebooks);
    if (status != AQLM_OK) {
        Py_DECREF(prepared);
        return raise_status(status, &err);
    }
    return prepared;
}

/* The body of a codebook-preparing binding, `name`(codebooks, *, param_dtype='float32'):
 * codebooks [M, K, 1, group] (any in_group_size where group is 0) with K a power of two in
 * [2**min_bits, 2**max_bits], then a new 1-D array of NumPy type `type` and size_of(format)
 * values filled by `prepare` (format_string: PyArg's, named for the binding). */
static PyObject *prepare_codebooks_binding(PyObject *args, PyObject *kwargs, const char *format_string, int min_bits,
                                           int max_bits, int group, int type, size_t (*size_of)(const aqlm_format *),
                                           prepare_fn prepare) {
    static char *keywords[] = {"codebooks", "param_dtype", NULL};
    PyObject *codebooks_object;
    const char *param_dtype_name = "float32";
    aqlm_dtype param_dtype;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format_string, keywords, &codebooks_object, &param_dtype_name) ||
        parse_float_dtype(param_dtype_name, "param_dtype", &param_dtype) < 0)
        return NULL;
    PyArrayObject *codebooks = float_input(codebooks_object, "codebooks", param_dtype, 4);
    if (codebooks == NULL) return NULL;
    const npy_intp *cb = PyArray_DIMS(codebooks);
    const int nbits = codebook_bits(cb[1], max_bits);
    if (nbits < min_bits || cb[2] != 1 || (group ? cb[3] != group : cb[3] < 1)) {
        char group_text[24] = "in_group_size";
        if (group) PyOS_snprintf(group_text, sizeof group_text, "%d", group);
        PyErr_Format(PyExc_ValueError, "codebooks must have shape [M, K, 1, %s] with K a power of two in [%lld, %lld], "
                                       "got [%zd, %zd, %zd, %zd]",
                     group_text, 1LL << min_bits, 1LL << max_bits, (Py_ssize_t)cb[0], (Py_ssize_t)cb[1],
                     (Py_ssize_t)cb[2], (Py_ssize_t)cb[3]);
        Py_DECREF(codebooks);
        return NULL;
    }
    const aqlm_format format = {1, cb[3], 1, cb[3], cb[0], nbits, nbits <= 8 ? 8 : 16};
    return new_prepared(codebooks, &format, param_dtype, type, (npy_intp)size_of(&format), prepare);
}

static aqlm_status lutq_prepare(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks, void *prepared,
                                aqlm_error *err) {
    return aqlm_lutq_prepare_codebooks(f, param_dtype, codebooks, prepared, err);
}

PyDoc_STRVAR(lutq_prepare_codebooks_doc,
"lutq_prepare_codebooks(codebooks, *, param_dtype='float32')\n"
"--\n\n"
"The codebooks [M, K <= 256, 1, in_group_size] as lutq_matmul reads them, prepared once: a new\n"
"1-D float32 array holding the codebooks rounded to int16 per column, in input pairs [M,\n"
"ceil(in_group_size / 2), K, 2] (csrc/lutq.h), then the largest |value| of each codebook's column\n"
"[M, in_group_size] and the largest codeword norm of each codebook [M] (the bounds that set the\n"
"table steps), then the column steps [M, in_group_size].");

static PyObject *py_lutq_prepare_codebooks(PyObject *module, PyObject *args, PyObject *kwargs) {
    return prepare_codebooks_binding(args, kwargs, "O|$s:lutq_prepare_codebooks", 1, 8, 0, NPY_FLOAT32,
                                     aqlm_lutq_prepared_size, lutq_prepare);
}

PyDoc_STRVAR(lutq_matmul_doc,
"lutq_matmul(x, packed, codebooks, scales, bias, out, *, group=64, x_dtype='float32', param_dtype='float32', simd=None, num_threads=None, prepared=None)\n"
"--\n\n"
"out [n, out_features] = x [n, in_features] @ W.T + bias by lookup tables of 16-bit entries (high\n"
"and low int8 tables) with one fp32 step per `group` input groups and codebook (1 <= group <= 256).\n"
"packed: from lutq_pack_codes.\n"
"codebooks [M, K <= 256, 1, in_group_size]; out_features = scales.size. bias may be None.\n"
"prepared: lutq_prepare_codebooks(codebooks) made once (the same values), or None to prepare them at\n"
"each call.");

/* The arguments lutq_matmul and lutw_matmul share, converted and checked (the GIL held). */
typedef struct {
    PyArrayObject *x, *codebooks, *scales, *bias; /* new references (bias NULL when None) */
    aqlm_format format;
    aqlm_dtype x_dtype, param_dtype;
    aqlm_simd simd;
} packed_matmul_args;

static void packed_matmul_release(packed_matmul_args *a) {
    Py_XDECREF(a->x), Py_XDECREF(a->codebooks), Py_XDECREF(a->scales), Py_XDECREF(a->bias);
}

/* 0 when the arguments are usable (then packed_matmul_release them), -1 with an exception set. */
static int packed_matmul_parse(PyObject *module, packed_matmul_args *a, PyObject *x_object, PyObject *packed,
                               PyObject *codebooks_object, PyObject *scales_object, PyObject *bias_object, PyObject *out,
                               const char *x_dtype_name, const char *param_dtype_name, const char *simd_name,
                               int num_threads) {
    a->x = a->codebooks = a->scales = a->bias = NULL;
    if (parse_float_dtype(x_dtype_name, "x_dtype", &a->x_dtype) < 0 ||
        parse_float_dtype(param_dtype_name, "param_dtype", &a->param_dtype) < 0 ||
        parse_simd(module, simd_name, &a->simd) < 0 || check_threads(num_threads) < 0)
        return -1;
    a->x = float_input(x_object, "x", a->x_dtype, 2);
    a->codebooks = a->x ? float_input(codebooks_object, "codebooks", a->param_dtype, 4) : NULL;
    a->scales = a->codebooks ? float_input(scales_object, "scales", a->param_dtype, -1) : NULL;
    if (!a->scales || (bias_object != Py_None && !(a->bias = float_input(bias_object, "bias", a->param_dtype, 1)))) goto fail;
    const npy_intp *cb = PyArray_DIMS(a->codebooks);
    const npy_intp n = PyArray_DIM(a->x, 0), in = PyArray_DIM(a->x, 1), out_features = PyArray_SIZE(a->scales);
    const int nbits = codebook_bits(cb[1], 8);
    if (nbits < 0 || cb[2] != 1 || cb[3] < 1 || in % cb[3] != 0) {
        PyErr_Format(PyExc_ValueError,
                     "codebooks must have shape [M, K, 1, in_group_size] with K a power of two in [2, 256] and "
                     "in_group_size dividing x's %zd features, got [%zd, %zd, %zd, %zd]",
                     (Py_ssize_t)in, (Py_ssize_t)cb[0], (Py_ssize_t)cb[1], (Py_ssize_t)cb[2], (Py_ssize_t)cb[3]);
        goto fail;
    }
    if (a->bias && PyArray_DIM(a->bias, 0) != out_features) {
        PyErr_Format(PyExc_ValueError, "bias must have out_features=%zd values, got %zd", (Py_ssize_t)out_features,
                     (Py_ssize_t)PyArray_DIM(a->bias, 0));
        goto fail;
    }
    a->format = (aqlm_format){out_features, in, 1, cb[3], cb[0], nbits, 8};
    aqlm_error err;
    if (aqlm_format_check(&a->format, &err) != AQLM_OK) {
        raise_status(AQLM_ERR_ARGUMENT, &err);
        goto fail;
    }
    if (check_packed(packed, &a->format, 0) < 0 || check_output(out, "out", a->x_dtype, n, out_features) < 0 ||
        check_no_overlap(out, "out", a->x, "x") < 0 || check_no_overlap(out, "out", (PyArrayObject *)packed, "packed") < 0 ||
        check_no_overlap(out, "out", a->codebooks, "codebooks") < 0 || check_no_overlap(out, "out", a->scales, "scales") < 0 ||
        check_no_overlap(out, "out", a->bias, "bias") < 0)
        goto fail;
    return 0;
fail:
    packed_matmul_release(a);
    return -1;
}

static PyObject *py_lutq_matmul(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"x", "packed", "codebooks", "scales", "bias", "out", "group", "x_dtype", "param_dtype",
                               "simd", "num_threads", "prepared", NULL};
    PyObject *x_object, *packed, *codebooks_object, *scales_object, *bias_object, *out, *prepared = Py_None;
    long long group = 64;
    const char *x_dtype_name = "float32", *param_dtype_name = "float32", *simd_name = NULL;
    int num_threads = omp_get_max_threads();
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|$LssziO:lutq_matmul", keywords, &x_object, &packed,
                                     &codebooks_object, &scales_object, &bias_object, &out, &group, &x_dtype_name,
                                     &param_dtype_name, &simd_name, &num_threads, &prepared))
        return NULL;
    packed_matmul_args a;
    if (packed_matmul_parse(module, &a, x_object, packed, codebooks_object, scales_object, bias_object, out,
                            x_dtype_name, param_dtype_name, simd_name, num_threads) < 0)
        return NULL;
    PyObject *result = NULL;
    if (prepared != Py_None && (check_prepared(prepared, &a.format) < 0 ||
                                check_no_overlap(out, "out", (PyArrayObject *)prepared, "prepared") < 0))
        goto done;
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = aqlm_lutq_matmul(&a.format, group, PyArray_DIM(a.x, 0), a.x_dtype, PyArray_DATA(a.x),
                              PyArray_DATA((PyArrayObject *)packed), a.param_dtype, PyArray_DATA(a.codebooks),
                              prepared != Py_None ? PyArray_DATA((PyArrayObject *)prepared) : NULL,
                              PyArray_DATA(a.scales), a.bias ? PyArray_DATA(a.bias) : NULL,
                              PyArray_DATA((PyArrayObject *)out), NULL, NULL, 0, a.simd, num_threads, &err);
    Py_END_ALLOW_THREADS
    result = none_or_raise(status, &err);
done:
    packed_matmul_release(&a);
    return result;
}

PyDoc_STRVAR(lutw_matmul_doc,
"lutw_matmul(x, packed, codebooks, scales, bias, out, *, x_dtype='float32', param_dtype='float32', simd=None, num_threads=None)\n"
"--\n\n"
"out [n, out_features] = x [n, in_features] @ W.T + bias by exact fp32 lookup tables that hold 16\n"
"tokens side by side (one load per code serves all of them). packed: from lutq_pack_codes.\n"
"codebooks [M, K <= 256, 1, in_group_size]; out_features = scales.size. bias may be None.\n"
"The bits do not depend on simd or num_threads.");

static PyObject *py_lutw_matmul(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"x", "packed", "codebooks", "scales", "bias", "out", "x_dtype", "param_dtype",
                               "simd", "num_threads", NULL};
    PyObject *x_object, *packed, *codebooks_object, *scales_object, *bias_object, *out;
    const char *x_dtype_name = "float32", *param_dtype_name = "float32", *simd_name = NULL;
    int num_threads = omp_get_max_threads();
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|$sszi:lutw_matmul", keywords, &x_object, &packed,
                                     &codebooks_object, &scales_object, &bias_object, &out, &x_dtype_name,
                                     &param_dtype_name, &simd_name, &num_threads))
        return NULL;
    packed_matmul_args a;
    if (packed_matmul_parse(module, &a, x_object, packed, codebooks_object, scales_object, bias_object, out,
                            x_dtype_name, param_dtype_name, simd_name, num_threads) < 0)
        return NULL;
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = aqlm_lutw_matmul(&a.format, PyArray_DIM(a.x, 0), a.x_dtype, PyArray_DATA(a.x),
                              PyArray_DATA((PyArrayObject *)packed), a.param_dtype, PyArray_DATA(a.codebooks),
                              PyArray_DATA(a.scales), a.bias ? PyArray_DATA(a.bias) : NULL,
                              PyArray_DATA((PyArrayObject *)out), a.simd, num_threads, &err);
    Py_END_ALLOW_THREADS
    packed_matmul_release(&a);
    return none_or_raise(status, &err);
}

/* A kernel over the codes that also reads prepared codebooks (decodeq's int8 ones, bf16's
 * bfloat16 ones; NULL for bf16: it rounds them itself), with one argument order for both. */
typedef aqlm_status (*prepared_matmul_fn)(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                                          const void *codes, aqlm_dtype param_dtype, const void *codebooks,
                                          const void *prepared, const void *scales, const void *bias, void *y,
                                          aqlm_simd simd, int num_threads, aqlm_error *err);

/* prepared must be an array made for this format, or the binding raises (0 / -1). */
typedef int (*prepared_check_fn)(PyObject *object, const aqlm_format *format);

/* The body of NAME(x, codes, codebooks, scales, bias, out, *, prepared, x_dtype, param_dtype,
 * simd, num_threads): arguments checked as codes_matmul_parse checks them, prepared by `check`
 * (required: a TypeError naming `missing` without it; otherwise None or absent reads none), then
 * `fn` without the GIL. */
static PyObject *prepared_matmul_binding(PyObject *module, PyObject *args, PyObject *kwargs, const char *format_string,
                                         const char *missing, prepared_check_fn check, prepared_matmul_fn fn) {
    static char *keywords[] = {"x", "codes", "codebooks", "scales", "bias", "out", "prepared", "x_dtype",
                               "param_dtype", "simd", "num_threads", NULL};
    PyObject *x_object, *codes, *codebooks, *scales, *bias, *out, *prepared = NULL;
    const char *x_dtype_name = "float32", *param_dtype = "float32", *simd_name = NULL;
    int num_threads = omp_get_max_threads();
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format_string, keywords, &x_object, &codes, &codebooks, &scales,
                                     &bias, &out, &prepared, &x_dtype_name, &param_dtype, &simd_name, &num_threads))
        return NULL;
    if (prepared == NULL && missing != NULL) {
        PyErr_SetString(PyExc_TypeError, missing);
        return NULL;
    }
    if (missing == NULL && prepared == Py_None) prepared = NULL;
    weight_args w;
    aqlm_dtype x_dtype;
    aqlm_simd simd;
    PyArrayObject *x;
    if (codes_matmul_parse(module, &w, &x, x_object, codes, codebooks, scales, bias, out, x_dtype_name, param_dtype,
                           simd_name, num_threads, &x_dtype, &simd) < 0)
        return NULL;
    if (prepared != NULL && (check(prepared, &w.format) < 0 ||
                             check_no_overlap(out, "out", (PyArrayObject *)prepared, "prepared") < 0)) {
        weight_args_release(&w);
        Py_DECREF(x);
        return NULL;
    }
    const void *prepared_data = prepared != NULL ? PyArray_DATA((PyArrayObject *)prepared) : NULL;
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = fn(&w.format, PyArray_DIM(x, 0), x_dtype, PyArray_DATA(x), PyArray_DATA(w.codes), w.param_dtype,
                PyArray_DATA(w.codebooks), prepared_data, PyArray_DATA(w.scales), w.bias ? PyArray_DATA(w.bias) : NULL,
                PyArray_DATA((PyArrayObject *)out), simd, num_threads, &err);
    Py_END_ALLOW_THREADS
    weight_args_release(&w);
    Py_DECREF(x);
    return none_or_raise(status, &err);
}

/* ---- int8 codebooks: decodeq --------------------------------------------------------------- */

/* prepared: int8, of aqlm_decodeq_prepared_size(format) bytes. */
static int check_decodeq_prepared(PyObject *object, const aqlm_format *format) {
    return check_prepared_array(object, NPY_INT8, "int8", aqlm_decodeq_prepared_size(format), "decodeq_prepare");
}

static aqlm_status decodeq_prepare(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks, void *prepared,
                                   aqlm_error *err) {
    return aqlm_decodeq_prepare(f, param_dtype, codebooks, prepared, err);
}

PyDoc_STRVAR(decodeq_prepare_doc,
"decodeq_prepare(codebooks, *, param_dtype='float32')\n"
"--\n\n"
"The codebooks [M, K, 1, 8] (K a power of two in [512, 65536]) as decodeq_matmul reads them,\n"
"prepared once: a new 1-D int8 array holding one float32 step per codebook, then the codebooks\n"
"rounded to int8 (csrc/decodeq.h). A NaN or infinity in the codebooks raises ValueError.");

static PyObject *py_decodeq_prepare(PyObject *module, PyObject *args, PyObject *kwargs) {
    return prepare_codebooks_binding(args, kwargs, "O|$s:decodeq_prepare", 9, 16, 8, NPY_INT8,
                                     aqlm_decodeq_prepared_size, decodeq_prepare);
}

PyDoc_STRVAR(decodeq_matmul_doc,
"decodeq_matmul(x, codes, codebooks, scales, bias, out, *, prepared, x_dtype='float32', param_dtype='float32', simd=None, num_threads=None)\n"
"--\n\n"
"out [n, out_features] = x [n, in_features] @ W.T + bias, decoding codewords from int8 codebooks\n"
"(prepared: decodeq_prepare(codebooks)) with each token's activations rounded to int16 (csrc/decodeq.h\n"
"bounds the error). Needs out_group_size 1, in_group_size 8 and codebooks of 512 to 65536\n"
"codewords; codebooks give the shape only. bias may be None. The bits do not depend on simd or\n"
"num_threads.");

static aqlm_status decodeq_matmul_call(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                                       const void *codes, aqlm_dtype param_dtype, const void *codebooks,
                                       const void *prepared, const void *scales, const void *bias, void *y,
                                       aqlm_simd simd, int num_threads, aqlm_error *err) {
    return aqlm_decodeq_matmul(f, n, x_dtype, x, codes, prepared, param_dtype, scales, bias, y, simd, num_threads, err);
}

static PyObject *py_decodeq_matmul(PyObject *module, PyObject *args, PyObject *kwargs) {
    return prepared_matmul_binding(module, args, kwargs, "OOOOOO|$Osszi:decodeq_matmul",
                                   "decodeq_matmul needs prepared= (from decodeq_prepare)", check_decodeq_prepared,
                                   decodeq_matmul_call);
}

/* ---- bfloat16 tiles: bf16 ------------------------------------------------------------------- */

/* prepared: uint16 (bfloat16 bit patterns), of aqlm_bf16_prepared_size(format) values. */
static int check_bf16_prepared(PyObject *object, const aqlm_format *format) {
    return check_prepared_array(object, NPY_UINT16, "uint16", aqlm_bf16_prepared_size(format), "bf16_prepare");
}

static aqlm_status bf16_prepare(const aqlm_format *f, aqlm_dtype param_dtype, const void *codebooks, void *prepared,
                                aqlm_error *err) {
    return aqlm_bf16_prepare(f, param_dtype, codebooks, prepared, err);
}

PyDoc_STRVAR(bf16_prepare_doc,
"bf16_prepare(codebooks, *, param_dtype='float32')\n"
"--\n\n"
"The codebooks [M, K, 1, in_group_size] rounded to bfloat16 once, as bf16_matmul rounds them at\n"
"each call: a new 1-D uint16 array of their bit patterns, for bf16_matmul(..., prepared=).");

static PyObject *py_bf16_prepare(PyObject *module, PyObject *args, PyObject *kwargs) {
    return prepare_codebooks_binding(args, kwargs, "O|$s:bf16_prepare", 1, 16, 0, NPY_UINT16, aqlm_bf16_prepared_size,
                                     bf16_prepare);
}

PyDoc_STRVAR(bf16_matmul_doc,
"bf16_matmul(x, codes, codebooks, scales, bias, out, *, x_dtype='float32', param_dtype='float32', simd=None, num_threads=None, prepared=None)\n"
"--\n\n"
"out [n, out_features] = x [n, in_features] @ W.T + bias in bfloat16 tiles (AMX where the CPU and\n"
"OS allow, else AVX-512 BF16, else the scalar reference; AQLM_AMX=0 turns AMX off): codewords and\n"
"activations rounded to bfloat16, products summed in float32. Needs out_group_size 1, an even\n"
"in_group_size dividing 32 and in_features divisible by 32. bias may be None. prepared:\n"
"bf16_prepare(codebooks), read instead of rounding the codebooks again (the same bits).");

static aqlm_status bf16_matmul_call(const aqlm_format *f, int64_t n, aqlm_dtype x_dtype, const void *x,
                                    const void *codes, aqlm_dtype param_dtype, const void *codebooks,
                                    const void *prepared, const void *scales, const void *bias, void *y,
                                    aqlm_simd simd, int num_threads, aqlm_error *err) {
    return aqlm_bf16_matmul_prepared(f, n, x_dtype, x, codes, param_dtype, codebooks, prepared, scales, bias, y, simd,
                                     num_threads, err);
}

static PyObject *py_bf16_matmul(PyObject *module, PyObject *args, PyObject *kwargs) {
    return prepared_matmul_binding(module, args, kwargs, "OOOOOO|$Osszi:bf16_matmul", NULL, check_bf16_prepared,
                                   bf16_matmul_call);
}

/* ---- bound calls: one weight's few-token kernel, its arguments checked once ------------------- */

/* Everything a few-token kernel call needs but the addresses of x and out: what bind_matmul
 * checked, for run_bound_matmul to call again and again (a decoding step calls each weight once
 * per token, and checking NumPy arguments costs microseconds a call). */
typedef enum { BOUND_LUTQ, BOUND_LUTW, BOUND_PREPARED, BOUND_CODES } bound_kind;
/* The weight arrays a bound call holds, by slot (codes: the packed codes for lutq/lutw). */
enum { SLOT_CODES, SLOT_CODEBOOKS, SLOT_SCALES, SLOT_BIAS, SLOT_PREPARED, BOUND_WEIGHT_ARRAYS };

typedef struct {
    bound_kind kind;
    matmul_fn codes_fn;            /* BOUND_CODES: the kernel over the codes as stored */
    prepared_matmul_fn prepared_fn; /* BOUND_PREPARED: the same, reading prepared codebooks (SLOT_PREPARED) */
    aqlm_format format;
    int64_t tokens, group;
    aqlm_dtype x_dtype, param_dtype;
    aqlm_simd simd;
    int num_threads;
    size_t x_bytes, out_bytes;
    const char *weight_first[BOUND_WEIGHT_ARRAYS], *weight_end[BOUND_WEIGHT_ARRAYS]; /* by slot; NULL: absent */
    PyObject *arrays; /* a tuple holding the weight arrays, so that the pointers above stay valid */
    int has_next;        /* BOUND_LUTQ: next holds the call that follows (bind_next) */
    aqlm_lutq_next next; /* only prefetched, never read: valid even once that call is gone */
    void *workspace;     /* BOUND_LUTQ: work memory of workspace_bytes for one call at a time, or NULL */
    size_t workspace_bytes;
    _Atomic int workspace_busy; /* a call is using it: another, at the same time, allocates its own */
} bound_matmul;

static const char BOUND_MATMUL_CAPSULE[] = "aqlm._C.bound_matmul";

static void bound_matmul_free(PyObject *capsule) {
    bound_matmul *b = PyCapsule_GetPointer(capsule, BOUND_MATMUL_CAPSULE);
    if (b == NULL) return;
    Py_XDECREF(b->arrays);
    free(b->workspace);
    PyMem_Free(b);
}

/* Takes the references in `held` (NULL entries allowed) into b->arrays and records their bytes. */
static int bound_matmul_hold(bound_matmul *b, PyArrayObject *held[BOUND_WEIGHT_ARRAYS]) {
    b->arrays = PyTuple_New(BOUND_WEIGHT_ARRAYS);
    if (b->arrays == NULL) return -1;
    for (int i = 0; i < BOUND_WEIGHT_ARRAYS; i++) {
        PyObject *item = held[i] ? (PyObject *)held[i] : Py_NewRef(Py_None);
        PyTuple_SET_ITEM(b->arrays, i, item);
        b->weight_first[i] = held[i] ? PyArray_BYTES(held[i]) : NULL;
        b->weight_end[i] = held[i] ? PyArray_BYTES(held[i]) + PyArray_NBYTES(held[i]) : NULL;
        held[i] = NULL;
    }
    return 0;
}

PyDoc_STRVAR(bind_matmul_doc,
"bind_matmul(kernel, x, weights, codebooks, scales, bias, out, *, group=64, x_dtype='float32', param_dtype='float32', simd=None, num_threads=None, prepared=None)\n"
"--\n\n"
"A bound call of one few-token kernel ('lutq', 'lutw': weights are the packed codes, as for\n"
"lutq_matmul; 'lut', 'decode', 'decodeq', 'bf16': weights are the codes, as for lut_matmul,\n"
"codebook_matmul, decodeq_matmul (with prepared), bf16_matmul (prepared optional)), checked now\n"
"exactly as that\n"
"function checks its arguments. x and out are templates: only their shapes and dtypes are used.\n"
"Run it with run_bound_matmul; it holds the weight arrays.");

static PyObject *py_bind_matmul(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"kernel", "x", "weights", "codebooks", "scales", "bias", "out", "group", "x_dtype",
                               "param_dtype", "simd", "num_threads", "prepared", NULL};
    const char *kernel, *x_dtype_name = "float32", *param_dtype_name = "float32", *simd_name = NULL;
    PyObject *x_object, *weights, *codebooks_object, *scales_object, *bias_object, *out, *prepared = Py_None;
    long long group = 64;
    int num_threads = omp_get_max_threads();
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sOOOOOO|$LssziO:bind_matmul", keywords, &kernel, &x_object,
                                     &weights, &codebooks_object, &scales_object, &bias_object, &out, &group,
                                     &x_dtype_name, &param_dtype_name, &simd_name, &num_threads, &prepared))
        return NULL;
    bound_matmul *b = PyMem_Calloc(1, sizeof *b);
    if (b == NULL) return PyErr_NoMemory();
    PyArrayObject *held[BOUND_WEIGHT_ARRAYS] = {NULL};
    const int packed_kernel = strcmp(kernel, "lutq") == 0 || strcmp(kernel, "lutw") == 0;
    if (packed_kernel) {
        packed_matmul_args a;
        if (packed_matmul_parse(module, &a, x_object, weights, codebooks_object, scales_object, bias_object, out,
                                x_dtype_name, param_dtype_name, simd_name, num_threads) < 0)
            goto fail;
        const int lutq = kernel[3] == 'q';
        if (lutq && prepared != Py_None && check_prepared(prepared, &a.format) < 0) {
            packed_matmul_release(&a);
            goto fail;
        }
        *b = (bound_matmul){.kind = lutq ? BOUND_LUTQ : BOUND_LUTW, .format = a.format, .tokens = PyArray_DIM(a.x, 0),
                            .group = group, .x_dtype = a.x_dtype, .param_dtype = a.param_dtype, .simd = a.simd,
                            .num_threads = num_threads};
        Py_DECREF(a.x);
        held[SLOT_CODES] = (PyArrayObject *)Py_NewRef(weights), held[SLOT_CODEBOOKS] = a.codebooks;
        held[SLOT_SCALES] = a.scales, held[SLOT_BIAS] = a.bias;
        if (lutq && prepared != Py_None) held[SLOT_PREPARED] = (PyArrayObject *)Py_NewRef(prepared);
    } else {
        const int decodeq = strcmp(kernel, "decodeq") == 0;
        const matmul_fn fn = strcmp(kernel, "lut") == 0      ? aqlm_lut_matmul
                             : strcmp(kernel, "decode") == 0 ? aqlm_codebook_matmul
                             : strcmp(kernel, "bf16") == 0   ? aqlm_bf16_matmul
                                                             : NULL;
        if (fn == NULL && !decodeq) {
            PyErr_Format(PyExc_ValueError, "kernel must be 'lutq', 'lutw', 'lut', 'decode', 'decodeq' or 'bf16', got '%s'",
                         kernel);
            goto fail;
        }
        weight_args w;
        PyArrayObject *x;
        aqlm_dtype x_dtype;
        aqlm_simd simd;
        if (codes_matmul_parse(module, &w, &x, x_object, weights, codebooks_object, scales_object, bias_object, out,
                               x_dtype_name, param_dtype_name, simd_name, num_threads, &x_dtype, &simd) < 0)
            goto fail;
        if (decodeq && prepared == Py_None)
            PyErr_SetString(PyExc_ValueError, "kernel 'decodeq' needs prepared= (from decodeq_prepare)");
        /* decodeq always reads prepared codebooks, bf16 where it is given them */
        const prepared_matmul_fn with_prepared = decodeq                                      ? decodeq_matmul_call
                                                 : fn == aqlm_bf16_matmul && prepared != Py_None ? bf16_matmul_call
                                                                                                 : NULL;
        const prepared_check_fn check = decodeq ? check_decodeq_prepared : check_bf16_prepared;
        if ((decodeq && prepared == Py_None) || (with_prepared && check(prepared, &w.format) < 0)) {
            weight_args_release(&w);
            Py_DECREF(x);
            goto fail;
        }
        *b = (bound_matmul){.kind = with_prepared ? BOUND_PREPARED : BOUND_CODES, .codes_fn = fn,
                            .prepared_fn = with_prepared, .format = w.format, .tokens = PyArray_DIM(x, 0),
                            .group = group, .x_dtype = x_dtype, .param_dtype = w.param_dtype, .simd = simd,
                            .num_threads = num_threads};
        Py_DECREF(x);
        held[SLOT_CODES] = w.codes, held[SLOT_CODEBOOKS] = w.codebooks, held[SLOT_SCALES] = w.scales;
        held[SLOT_BIAS] = w.bias;
        if (with_prepared) held[SLOT_PREPARED] = (PyArrayObject *)Py_NewRef(prepared);
    }
    if (bound_matmul_hold(b, held) < 0) goto fail;
    if (b->kind == BOUND_LUTQ) { /* without it (no memory), each call allocates its own */
        const size_t bytes = aqlm_lutq_workspace_size(&b->format, b->group, b->tokens, b->x_dtype, b->num_threads);
        b->workspace = aligned_alloc(64, (bytes + 63) / 64 * 64);
        b->workspace_bytes = b->workspace ? bytes : 0;
    }
    b->x_bytes = (size_t)b->tokens * (size_t)b->format.in_features * aqlm_dtype_size(b->x_dtype);
    b->out_bytes = (size_t)b->tokens * (size_t)b->format.out_features * aqlm_dtype_size(b->x_dtype);
    PyObject *capsule = PyCapsule_New(b, BOUND_MATMUL_CAPSULE, bound_matmul_free);
    if (capsule == NULL) {
        Py_DECREF(b->arrays);
        free(b->workspace);
        PyMem_Free(b);
    }
    return capsule;
fail:
    for (int i = 0; i < BOUND_WEIGHT_ARRAYS; i++) Py_XDECREF(held[i]);
    PyMem_Free(b);
    return NULL;
}

/* A nonzero address from a Python int, or NULL with an exception set. */
static char *address_argument(PyObject *object, const char *name) {
    if (!PyLong_Check(object)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int (a data address), got %s", name, Py_TYPE(object)->tp_name);
        return NULL;
    }
    char *address = PyLong_AsVoidPtr(object);
    if (address == NULL && !PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s must not be 0", name);
    return address;
}

static int ranges_overlap(const char *first, size_t bytes, const char *other_first, const char *other_end) {
    return other_first != NULL && first < other_end && other_first < first + bytes;
}

/* Whether `bytes` bytes from out share any with bound call b's weight arrays. */
static int overlaps_weight(const bound_matmul *b, const char *out, size_t bytes) {
    for (int i = 0; i < BOUND_WEIGHT_ARRAYS; i++)
        if (ranges_overlap(out, bytes, b->weight_first[i], b->weight_end[i])) return 1;
    return 0;
}

/* Rejects an out that shares bytes with any of bound call b's weight arrays. */
static int check_out_apart_from_weight(const bound_matmul *b, const char *out) {
    if (overlaps_weight(b, out, b->out_bytes)) {
        PyErr_SetString(PyExc_ValueError, "out must not overlap the weight in memory");
        return -1;
    }
    return 0;
}

/* A BOUND_LUTQ call's arguments on x and out, with next (filled here) and soon (NULL, or soon_bytes
 * bytes read soon after) to prefetch; its bound workspace, unless another thread's call on this
 * weight holds it now (*mine says whether it took it: bound_lutq_release gives it back). */
static aqlm_lutq_call bound_lutq_call(bound_matmul *b, const char *x, char *out, aqlm_lutq_next *next,
                                      const void *soon, int64_t soon_bytes, int *mine) {
    const void *const *weight = (const void *const *)b->weight_first;
    *next = b->has_next ? b->next : (aqlm_lutq_next){.prepared = NULL};
    next->soon = soon, next->soon_bytes = soon_bytes;
    *mine = b->workspace != NULL && atomic_exchange(&b->workspace_busy, 1) == 0;
    return (aqlm_lutq_call){.format = &b->format, .group = b->group, .n = b->tokens, .x_dtype = b->x_dtype, .x = x,
                            .packed = weight[SLOT_CODES], .param_dtype = b->param_dtype,
                            .codebooks = weight[SLOT_CODEBOOKS], .prepared = weight[SLOT_PREPARED],
                            .scales = weight[SLOT_SCALES], .bias = weight[SLOT_BIAS], .y = out,
                            .next = b->has_next || soon ? next : NULL, .workspace = *mine ? b->workspace : NULL,
                            .workspace_bytes = *mine ? b->workspace_bytes : 0};
}

static void bound_lutq_release(bound_matmul *b, int mine) {
    if (mine) atomic_store(&b->workspace_busy, 0);
}

/* Runs bound call b on x and out (checked by the caller); a 'lutq' call also prefetches soon_bytes
 * from `soon` (NULL: nothing) as it builds its tables (aqlm_lutq_next). */
static aqlm_status bound_matmul_run(bound_matmul *b, const char *x, char *out, const void *soon, int64_t soon_bytes,
                                    aqlm_error *err) {
    const void *const *weight = (const void *const *)b->weight_first;
    switch (b->kind) {
    case BOUND_LUTQ: {
        aqlm_lutq_next next;
        int mine;
        const aqlm_lutq_call c = bound_lutq_call(b, x, out, &next, soon, soon_bytes, &mine);
        const aqlm_status status = aqlm_lutq_matmul(c.format, c.group, c.n, c.x_dtype, c.x, c.packed, c.param_dtype,
                                                    c.codebooks, c.prepared, c.scales, c.bias, c.y, c.next,
                                                    c.workspace, c.workspace_bytes, b->simd, b->num_threads, err);
        bound_lutq_release(b, mine);
        return status;
    }
    case BOUND_LUTW:
        return aqlm_lutw_matmul(&b->format, b->tokens, b->x_dtype, x, weight[SLOT_CODES], b->param_dtype,
                                weight[SLOT_CODEBOOKS], weight[SLOT_SCALES], weight[SLOT_BIAS], out, b->simd,
                                b->num_threads, err);
    case BOUND_PREPARED:
        return b->prepared_fn(&b->format, b->tokens, b->x_dtype, x, weight[SLOT_CODES], b->param_dtype,
                              weight[SLOT_CODEBOOKS], weight[SLOT_PREPARED], weight[SLOT_SCALES], weight[SLOT_BIAS],
                              out, b->simd, b->num_threads, err);
    default:
        return b->codes_fn(&b->format, b->tokens, b->x_dtype, x, weight[SLOT_CODES], b->param_dtype,
                           weight[SLOT_CODEBOOKS], weight[SLOT_SCALES], weight[SLOT_BIAS], out, b->simd,
                           b->num_threads, err);
    }
}

PyDoc_STRVAR(run_bound_matmul_doc,
"run_bound_matmul(bound, x_address, out_address)\n"
"--\n\n"
"Runs a bind_matmul call on x [tokens, in_features] and out [tokens, out_features], C-contiguous\n"
"buffers of the bound dtype given by their data addresses (the caller guarantees their size and\n"
"lifetime; out must not overlap x or the weight, which is checked). With 0 tokens it does nothing.");

static PyObject *py_run_bound_matmul(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "run_bound_matmul takes 3 arguments (bound, x_address, out_address), got %zd",
                     nargs);
        return NULL;
    }
    bound_matmul *b = PyCapsule_GetPointer(args[0], BOUND_MATMUL_CAPSULE);
    if (b == NULL) return NULL;
    if (b->tokens == 0) Py_RETURN_NONE; /* empty x and out: nothing to read or write, and no address to trust */
    const char *x = address_argument(args[1], "x_address");
    char *out = x ? address_argument(args[2], "out_address") : NULL;
    if (out == NULL) return NULL;
    if (ranges_overlap(out, b->out_bytes, x, x + b->x_bytes)) {
        PyErr_SetString(PyExc_ValueError, "out must not overlap x in memory");
        return NULL;
    }
    if (check_out_apart_from_weight(b, out) < 0) return NULL;
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = bound_matmul_run(b, x, out, NULL, 0, &err);
    Py_END_ALLOW_THREADS
    return none_or_raise(status, &err);
}

PyDoc_STRVAR(bind_next_doc,
"bind_next(bound, next)\n"
"--\n\n"
"Tells the bound call `bound` which bound call runs after it (`next`, or None for none): a 'lutq'\n"
"call then prefetches the first memory a 'lutq' next reads (its prepared codebooks and first codes)\n"
"while it builds its own tables. Only a hint, for a loop that runs the same calls in the same order\n"
"(a decoding step): results do not change, and other kernels ignore it.");

static PyObject *py_bind_next(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "bind_next takes 2 arguments (bound, next), got %zd", nargs);
        return NULL;
    }
    bound_matmul *b = PyCapsule_GetPointer(args[0], BOUND_MATMUL_CAPSULE);
    if (b == NULL) return NULL;
    const bound_matmul *next = NULL;
    if (args[1] != Py_None && (next = PyCapsule_GetPointer(args[1], BOUND_MATMUL_CAPSULE)) == NULL) return NULL;
    b->has_next = b->kind == BOUND_LUTQ && next != NULL && next->kind == BOUND_LUTQ;
    if (b->has_next)
        b->next = (aqlm_lutq_next){.format = next->format, .packed = (const uint8_t *)next->weight_first[SLOT_CODES],
                                   .prepared = (const float *)next->weight_first[SLOT_PREPARED]};
    Py_RETURN_NONE;
}

/* name_of(simd) for the optional `simd` argument; `format` is "|z:FUNCTION" (for its errors). */
static PyObject *kernel_name(PyObject *module, PyObject *args, PyObject *kwargs, const char *format,
                             const char *(*name_of)(aqlm_simd)) {
    static char *keywords[] = {"simd", NULL};
    const char *simd_name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format, keywords, &simd_name)) return NULL;
    aqlm_simd simd;
    if (parse_simd(module, simd_name, &simd) < 0) return NULL;
    return PyUnicode_FromString(name_of(simd));
}

PyDoc_STRVAR(lutw_kernel_doc, "lutw_kernel(simd=None)\n--\n\nThe wide-token table kernels used at that SIMD level: 'scalar', 'avx2' or 'avx512'.");
static PyObject *py_lutw_kernel(PyObject *module, PyObject *args, PyObject *kwargs) {
    return kernel_name(module, args, kwargs, "|z:lutw_kernel", aqlm_lutw_kernel_name);
}

PyDoc_STRVAR(bf16_kernel_doc, "bf16_kernel(simd=None)\n--\n\nThe bfloat16 tile kernels used at that SIMD level: 'amx', 'avx512bf16' or 'scalar' (AQLM_AMX=0 turns AMX off).");
static PyObject *py_bf16_kernel(PyObject *module, PyObject *args, PyObject *kwargs) {
    return kernel_name(module, args, kwargs, "|z:bf16_kernel", aqlm_bf16_kernel_name);
}

PyDoc_STRVAR(decodeq_kernel_doc, "decodeq_kernel(simd=None, tokens=1)\n--\n\nThe int8-codebook kernels a call of that many tokens uses at that SIMD level: 'avx512vnni' (gathers; AQLM_DECODEQ_GATHER=0 turns them off), 'avx512', 'avx2' or 'scalar'.");
static PyObject *py_decodeq_kernel(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"simd", "tokens", NULL};
    const char *simd_name = NULL;
    long long tokens = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|zL:decodeq_kernel", keywords, &simd_name, &tokens)) return NULL;
    if (tokens < 1) {
        PyErr_Format(PyExc_ValueError, "tokens must be >= 1, got %lld", tokens);
        return NULL;
    }
    aqlm_simd simd;
    if (parse_simd(module, simd_name, &simd) < 0) return NULL;
    return PyUnicode_FromString(aqlm_decodeq_kernel_name(simd, (int64_t)tokens));
}

PyDoc_STRVAR(lutq_kernel_doc, "lutq_kernel(simd=None)\n--\n\nThe quantized-table kernels used at that SIMD level: 'scalar', 'avx2' or 'avx512vbmi'.");
static PyObject *py_lutq_kernel(PyObject *module, PyObject *args, PyObject *kwargs) {
    return kernel_name(module, args, kwargs, "|z:lutq_kernel", aqlm_lutq_kernel_name);
}

/* Called by long C loops between steps, outside parallel regions, with the GIL released. */
static int check_signals(void *unused) {
    PyGILState_STATE gil = PyGILState_Ensure();
    const int stop = PyErr_CheckSignals() != 0;
    PyGILState_Release(gil);
    return stop;
}

/* An in/out array: exact dtype, given ndim, C-contiguous, writeable. */
static PyArrayObject *inout_array(PyObject *object, const char *name, int type_a, int type_b, int ndim) {
    if (!PyArray_Check(object)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name, Py_TYPE(object)->tp_name);
        return NULL;
    }
    PyArrayObject *array = (PyArrayObject *)object;
    const int type = PyArray_TYPE(array);
    if (type != type_a && type != type_b) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s, got %s", name,
                     PyArray_DescrFromType(type_a)->typeobj->tp_name, PyArray_DESCR(array)->typeobj->tp_name);
        return NULL;
    }
    if (ndim >= 0 && PyArray_NDIM(array) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", name, ndim, PyArray_NDIM(array));
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(array) || !PyArray_ISWRITEABLE(array)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and writeable", name);
        return NULL;
    }
    Py_INCREF(array);
    return array;
}

/* An int8 weight [out, in]: int8, 2-D, C-contiguous; never copied or converted. */
static PyArrayObject *int8_weight_input(PyObject *object) {
    if (!PyArray_Check(object)) {
        PyErr_Format(PyExc_TypeError, "weight must be a numpy.ndarray, got %s", Py_TYPE(object)->tp_name);
        return NULL;
    }
    PyArrayObject *weight = (PyArrayObject *)object;
    if (PyArray_TYPE(weight) != NPY_INT8) {
        PyErr_Format(PyExc_TypeError, "weight must have dtype int8, got %s", PyArray_DESCR(weight)->typeobj->tp_name);
        return NULL;
    }
    if (PyArray_NDIM(weight) != 2) {
        PyErr_Format(PyExc_ValueError, "weight must have 2 dimensions [out_features, in_features], got %d",
                     PyArray_NDIM(weight));
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(weight)) {
        PyErr_SetString(PyExc_ValueError, "weight must be C-contiguous");
        return NULL;
    }
    Py_INCREF(weight);
    return weight;
}

/* A 1-D float32 vector of `size` values (copied only if strided). */
static PyArrayObject *float32_vector_input(PyObject *object, const char *name, npy_intp size) {
    PyArrayObject *vector = float_input(object, name, AQLM_F32, 1);
    if (vector && PyArray_DIM(vector, 0) != size) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%zd,) (out_features), got (%zd,)", name, (Py_ssize_t)size,
                     (Py_ssize_t)PyArray_DIM(vector, 0));
        Py_DECREF(vector);
        return NULL;
    }
    return vector;
}

PyDoc_STRVAR(int8_matmul_doc,
"int8_matmul(x, weight, scales, bias, out, *, simd=None, num_threads=None)\n"
"--\n\n"
"out [n, out_features] = scales * (x [n, in_features] @ weight.T) + bias for an int8 weight\n"
"[out_features, in_features] with one float32 scale per row (scales [out_features]), each token\n"
"of x rounded to int16 with one step per token and the dot products exact (aqlm.h). x, scales,\n"
"bias (or None) and out are float32; out must not overlap the inputs.");

static PyObject *py_int8_matmul(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"x", "weight", "scales", "bias", "out", "simd", "num_threads", NULL};
    PyObject *x_object, *weight_object, *scales_object, *bias_object, *out;
    const char *simd_name = NULL;
    int num_threads = omp_get_max_threads();
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|$zi:int8_matmul", keywords, &x_object, &weight_object,
                                     &scales_object, &bias_object, &out, &simd_name, &num_threads))
        return NULL;
    aqlm_simd simd;
    if (parse_simd(module, simd_name, &simd) < 0 || check_threads(num_threads) < 0) return NULL;
    PyArrayObject *x = float_input(x_object, "x", AQLM_F32, 2);
    PyArrayObject *weight = x ? int8_weight_input(weight_object) : NULL;
    PyArrayObject *scales = NULL, *bias = NULL;
    PyObject *result = NULL;
    if (!weight) goto done;
    const npy_intp n = PyArray_DIM(x, 0), in = PyArray_DIM(x, 1), out_features = PyArray_DIM(weight, 0);
    if (PyArray_DIM(weight, 1) != in) {
        PyErr_Format(PyExc_ValueError, "weight must have shape (out_features, %zd) to match x [n, %zd], got (%zd, %zd)",
                     (Py_ssize_t)in, (Py_ssize_t)in, (Py_ssize_t)out_features, (Py_ssize_t)PyArray_DIM(weight, 1));
        goto done;
    }
    if (!(scales = float32_vector_input(scales_object, "scales", out_features))) goto done;
    if (bias_object != Py_None && !(bias = float32_vector_input(bias_object, "bias", out_features))) goto done;
    if (check_output(out, "out", AQLM_F32, n, out_features) < 0 || check_no_overlap(out, "out", x, "x") < 0 ||
        check_no_overlap(out, "out", weight, "weight") < 0 || check_no_overlap(out, "out", scales, "scales") < 0 ||
        check_no_overlap(out, "out", bias, "bias") < 0)
        goto done;
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = aqlm_int8_matmul(n, in, out_features, PyArray_DATA(x), PyArray_DATA(weight), PyArray_DATA(scales),
                              bias ? PyArray_DATA(bias) : NULL, PyArray_DATA((PyArrayObject *)out), simd, num_threads, &err);
    Py_END_ALLOW_THREADS
    result = none_or_raise(status, &err);
done:
    Py_XDECREF(x), Py_XDECREF(weight), Py_XDECREF(scales), Py_XDECREF(bias);
    return result;
}

PyDoc_STRVAR(int8_quantize_rows_doc,
"int8_quantize_rows(weight, q, scales, *, num_threads=None)\n"
"--\n\n"
"Symmetric per-row int8 quantization of weight [out_features, in_features] float32 into q (int8,\n"
"same shape) and scales [out_features] float32: scale = max |row| / 127, q = row / scale rounded\n"
"to nearest even and clamped to [-127, 127]; all-zero rows get scale 0. NaN/Inf raise ValueError.");

static PyObject *py_int8_quantize_rows(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"weight", "q", "scales", "num_threads", NULL};
    PyObject *weight_object, *q_object, *scales_object;
    int num_threads = omp_get_max_threads();
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$i:int8_quantize_rows", keywords, &weight_object, &q_object,
                                     &scales_object, &num_threads))
        return NULL;
    if (check_threads(num_threads) < 0) return NULL;
    PyArrayObject *weight = float_input(weight_object, "weight", AQLM_F32, 2);
    PyArrayObject *q = weight ? inout_array(q_object, "q", NPY_INT8, NPY_INT8, 2) : NULL;
    PyArrayObject *scales = q ? inout_array(scales_object, "scales", NPY_FLOAT32, NPY_FLOAT32, 1) : NULL;
    PyObject *result = NULL;
    if (!scales) goto done;
    const npy_intp out_features = PyArray_DIM(weight, 0), in = PyArray_DIM(weight, 1);
    if (PyArray_DIM(q, 0) != out_features || PyArray_DIM(q, 1) != in) {
        PyErr_Format(PyExc_ValueError, "q must have the weight's shape (%zd, %zd), got (%zd, %zd)", (Py_ssize_t)out_features,
                     (Py_ssize_t)in, (Py_ssize_t)PyArray_DIM(q, 0), (Py_ssize_t)PyArray_DIM(q, 1));
        goto done;
    }
    if (PyArray_DIM(scales, 0) != out_features) {
        PyErr_Format(PyExc_ValueError, "scales must have shape (%zd,) (out_features), got (%zd,)", (Py_ssize_t)out_features,
                     (Py_ssize_t)PyArray_DIM(scales, 0));
        goto done;
    }
    if (check_no_overlap((PyObject *)q, "q", weight, "weight") < 0 ||
        check_no_overlap((PyObject *)scales, "scales", weight, "weight") < 0 ||
        check_no_overlap((PyObject *)scales, "scales", q, "q") < 0)
        goto done;
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = aqlm_int8_quantize_rows(out_features, in, PyArray_DATA(weight), PyArray_DATA(q), PyArray_DATA(scales),
                                     num_threads, &err);
    Py_END_ALLOW_THREADS
    result = none_or_raise(status, &err);
done:
    Py_XDECREF(weight), Py_XDECREF(q), Py_XDECREF(scales);
    return result;
}

PyDoc_STRVAR(kmeans_doc,
"kmeans(x, k, *, max_iter=25, tolerance=1e-4, max_points_per_centroid=256, init='random', seed=0, simd=None, num_threads=None)\n"
"--\n\n"
"Lloyd's k-means of x [n, d] float32 (d <= 64) into k centroids. init is 'random' or 'kmeans++';\n"
"max_points_per_centroid=0 trains on all points. Returns (centroids [k, d] float32,\n"
"assignment [n] int32, objective: sum of squared distances of all points).");

static PyObject *py_kmeans(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"x", "k", "max_iter", "tolerance", "max_points_per_centroid", "init", "seed", "simd",
                               "num_threads", NULL};
    PyObject *x_object;
    Py_ssize_t k;
    aqlm_kmeans_params params = aqlm_kmeans_params_default();
    long long max_points = params.max_points_per_centroid;
    unsigned long long seed = 0;
    const char *init = "random", *simd_name = NULL;
    int num_threads = omp_get_max_threads();
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On|$idLsKzi:kmeans", keywords, &x_object, &k, &params.max_iter,
                                     &params.tolerance, &max_points, &init, &seed, &simd_name, &num_threads))
        return NULL;
    aqlm_simd simd;
    if (parse_simd(module, simd_name, &simd) < 0 || check_threads(num_threads) < 0) return NULL;
    if (strcmp(init, "random") == 0) params.init = AQLM_KMEANS_INIT_RANDOM;
    else if (strcmp(init, "kmeans++") == 0) params.init = AQLM_KMEANS_INIT_PLUSPLUS;
    else return PyErr_Format(PyExc_ValueError, "init must be 'random' or 'kmeans++', got '%s'", init);
    params.max_points_per_centroid = max_points;
    params.seed = seed;
    PyArrayObject *x = float_input(x_object, "x", AQLM_F32, 2);
    if (x == NULL) return NULL;
    const npy_intp n = PyArray_DIM(x, 0), d = PyArray_DIM(x, 1);
    if (k < 1) {
        Py_DECREF(x);
        return PyErr_Format(PyExc_ValueError, "k must be >= 1, got %zd", k);
    }
    npy_intp centroid_shape[2] = {(npy_intp)k, d}, assignment_shape[1] = {n};
    PyArrayObject *centroids = (PyArrayObject *)PyArray_SimpleNew(2, centroid_shape, NPY_FLOAT32);
    PyArrayObject *assignment = (PyArrayObject *)PyArray_SimpleNew(1, assignment_shape, NPY_INT32);
    if (!centroids || !assignment) {
        Py_DECREF(x), Py_XDECREF(centroids), Py_XDECREF(assignment);
        return NULL;
    }
    aqlm_error err;
    aqlm_status status;
    double objective = 0.0;
    Py_BEGIN_ALLOW_THREADS
    status = aqlm_kmeans(n, d, k, PyArray_DATA(x), &params, PyArray_DATA(centroids), PyArray_DATA(assignment),
                         &objective, simd, num_threads, check_signals, NULL, &err);
    Py_END_ALLOW_THREADS
    Py_DECREF(x);
    if (status != AQLM_OK) {
        Py_DECREF(centroids), Py_DECREF(assignment);
        return raise_status(status, &err);
    }
    return Py_BuildValue("NNd", centroids, assignment, objective);
}

PyDoc_STRVAR(beam_search_doc,
"beam_search(xtx, codebooks, scales, codes, gradient, losses, *, allowed=None, beam_size=1, shuffle=False, seed=0, simd=None, num_threads=None, norms_budget_bytes=536870912)\n"
"--\n\n"
"One beam-search pass over the codes minimising, per output group, tr((W - What) xtx (W - What)^T).\n"
"xtx [in, in] float32 or None (identity: plain squared error); codebooks [M, K, og, ig] float32;\n"
"scales (one float32 per output group); codes [out/og, in/ig, M] int8/int16 (packed), gradient\n"
"[out, in] float32 = (W - What) @ xtx, losses [out/og] float64: all three updated in place.\n"
"allowed [out/og, in/ig] uint8/bool or None: only groups with allowed != 0 may change.\n"
"Codeword norms are precomputed when they fit in norms_budget_bytes, else computed at each step.");

static PyObject *py_beam_search(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"xtx", "codebooks", "scales", "codes", "gradient", "losses", "allowed", "beam_size",
                               "shuffle", "seed", "simd", "num_threads", "norms_budget_bytes", NULL};
    PyObject *xtx_object, *codebooks_object, *scales_object, *codes_object, *gradient_object, *losses_object;
    PyObject *allowed_object = Py_None;
    aqlm_beam_params params = aqlm_beam_params_default();
    unsigned long long seed = 0;
    const char *simd_name = NULL;
    int num_threads = omp_get_max_threads();
    Py_ssize_t norms_budget = (Py_ssize_t)params.norms_budget_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|$OipKzin:beam_search", keywords, &xtx_object,
                                     &codebooks_object, &scales_object, &codes_object, &gradient_object,
                                     &losses_object, &allowed_object, &params.beam_size, &params.shuffle, &seed,
                                     &simd_name, &num_threads, &norms_budget))
        return NULL;
    if (norms_budget < 0) return PyErr_Format(PyExc_ValueError, "norms_budget_bytes must be >= 0, got %zd", norms_budget);
    params.seed = seed;
    params.norms_budget_bytes = (size_t)norms_budget;
    aqlm_simd simd;
    if (parse_simd(module, simd_name, &simd) < 0 || check_threads(num_threads) < 0) return NULL;
    weight_args w;
    PyArrayObject *xtx = NULL, *gradient = NULL, *losses = NULL, *allowed = NULL;
    if (weight_args_parse(&w, codes_object, codebooks_object, scales_object, Py_None, "float32") < 0) goto fail;
    if (!PyArray_ISWRITEABLE(w.codes)) {
        PyErr_SetString(PyExc_ValueError, "codes must be writeable");
        goto fail;
    }
    const npy_intp out = (npy_intp)w.format.out_features, in = (npy_intp)w.format.in_features;
    const npy_intp out_groups = PyArray_DIM(w.codes, 0), in_groups = PyArray_DIM(w.codes, 1);
    if (xtx_object != Py_None) {
        if (!(xtx = float_input(xtx_object, "xtx", AQLM_F32, 2))) goto fail;
        if (PyArray_DIM(xtx, 0) != in || PyArray_DIM(xtx, 1) != in) {
            PyErr_Format(PyExc_ValueError, "xtx must have shape (%zd, %zd), got (%zd, %zd)", (Py_ssize_t)in,
                         (Py_ssize_t)in, (Py_ssize_t)PyArray_DIM(xtx, 0), (Py_ssize_t)PyArray_DIM(xtx, 1));
            goto fail;
        }
    }
    if (!(gradient = inout_array(gradient_object, "gradient", NPY_FLOAT32, NPY_FLOAT32, 2))) goto fail;
    if (PyArray_DIM(gradient, 0) != out || PyArray_DIM(gradient, 1) != in) {
        PyErr_Format(PyExc_ValueError, "gradient must have shape (%zd, %zd)", (Py_ssize_t)out, (Py_ssize_t)in);
        goto fail;
    }
    if (!(losses = inout_array(losses_object, "losses", NPY_FLOAT64, NPY_FLOAT64, 1))) goto fail;
    if (PyArray_DIM(losses, 0) != out_groups) {
        PyErr_Format(PyExc_ValueError, "losses must have shape (%zd,)", (Py_ssize_t)out_groups);
        goto fail;
    }
    if (allowed_object != Py_None) {
        if (!PyArray_Check(allowed_object) ||
            (PyArray_TYPE((PyArrayObject *)allowed_object) != NPY_UINT8 && PyArray_TYPE((PyArrayObject *)allowed_object) != NPY_BOOL)) {
            PyErr_SetString(PyExc_TypeError, "allowed must be a numpy.ndarray of dtype uint8 or bool");
            goto fail;
        }
        allowed = (PyArrayObject *)PyArray_FROM_OF(allowed_object, NPY_ARRAY_CARRAY_RO);
        if (!allowed) goto fail;
        if (PyArray_NDIM(allowed) != 2 || PyArray_DIM(allowed, 0) != out_groups || PyArray_DIM(allowed, 1) != in_groups) {
            PyErr_Format(PyExc_ValueError, "allowed must have shape (%zd, %zd)", (Py_ssize_t)out_groups, (Py_ssize_t)in_groups);
            goto fail;
        }
    }
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = aqlm_beam_search(&w.format, xtx ? PyArray_DATA(xtx) : NULL, PyArray_DATA(w.codebooks),
                              PyArray_DATA(w.scales), allowed ? PyArray_DATA(allowed) : NULL, PyArray_DATA(w.codes),
                              PyArray_DATA(gradient), PyArray_DATA(losses), &params, simd, num_threads,
                              check_signals, NULL, &err);
    Py_END_ALLOW_THREADS
    weight_args_release(&w);
    Py_XDECREF(xtx), Py_DECREF(gradient), Py_DECREF(losses), Py_XDECREF(allowed);
    return none_or_raise(status, &err);
fail:
    weight_args_release(&w);
    Py_XDECREF(xtx), Py_XDECREF(gradient), Py_XDECREF(losses), Py_XDECREF(allowed);
    return NULL;
}

PyDoc_STRVAR(topk_scores_doc,
"topk_scores(q, ct, bias, k, *, simd=None)\n"
"--\n\n"
"Inner loop, exposed for tests: for each row of q [n, D], the k smallest of\n"
"bias[c] + q . ct[:, c] over c (ct [D, K], bias [K], all float32). Returns (values [n, k], indices [n, k]).");

static PyObject *py_topk_scores(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"q", "ct", "bias", "k", "simd", NULL};
    PyObject *q_object, *ct_object, *bias_object;
    Py_ssize_t k;
    const char *simd_name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOn|$z:topk_scores", keywords, &q_object, &ct_object,
                                     &bias_object, &k, &simd_name))
        return NULL;
    aqlm_simd simd;
    if (parse_simd(module, simd_name, &simd) < 0) return NULL;
    PyArrayObject *q = float_input(q_object, "q", AQLM_F32, 2);
    PyArrayObject *ct = q ? float_input(ct_object, "ct", AQLM_F32, 2) : NULL;
    PyArrayObject *bias = ct ? float_input(bias_object, "bias", AQLM_F32, 1) : NULL;
    PyObject *result = NULL;
    if (!bias) goto done;
    const npy_intp n = PyArray_DIM(q, 0), D = PyArray_DIM(q, 1), K = PyArray_DIM(ct, 1);
    if (PyArray_DIM(ct, 0) != D || PyArray_DIM(bias, 0) != K || k < 1 || k > K) {
        PyErr_Format(PyExc_ValueError, "need q [n, D], ct [D, K], bias [K] and 1 <= k <= K; got D=%zd, ct %zdx%zd, bias %zd, k=%zd",
                     (Py_ssize_t)D, (Py_ssize_t)PyArray_DIM(ct, 0), (Py_ssize_t)K, (Py_ssize_t)PyArray_DIM(bias, 0), k);
        goto done;
    }
    npy_intp shape[2] = {n, (npy_intp)k};
    PyArrayObject *values = (PyArrayObject *)PyArray_SimpleNew(2, shape, NPY_FLOAT32);
    PyArrayObject *indices = (PyArrayObject *)PyArray_SimpleNew(2, shape, NPY_INT32);
    if (!values || !indices) {
        Py_XDECREF(values), Py_XDECREF(indices);
        goto done;
    }
    const aqlm_kernels *kernels = aqlm_kernels_for(simd);
    Py_BEGIN_ALLOW_THREADS
    kernels->topk_scores(n, D, K, k, PyArray_DATA(q), PyArray_DATA(ct), PyArray_DATA(bias), PyArray_DATA(values),
                         PyArray_DATA(indices));
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("NN", values, indices);
done:
    Py_XDECREF(q), Py_XDECREF(ct), Py_XDECREF(bias);
    return result;
}

PyDoc_STRVAR(gradient_update_doc,
"gradient_update(delta, h, g, *, simd=None)\n"
"--\n\n"
"Inner loop, exposed for tests: g[r] -= delta[r] @ h in place (delta [n, ig], h [ig, width],\n"
"g [n, width], all float32).");

static PyObject *py_gradient_update(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"delta", "h", "g", "simd", NULL};
    PyObject *delta_object, *h_object, *g_object;
    const char *simd_name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$z:gradient_update", keywords, &delta_object, &h_object,
                                     &g_object, &simd_name))
        return NULL;
    aqlm_simd simd;
    if (parse_simd(module, simd_name, &simd) < 0) return NULL;
    PyArrayObject *delta = float_input(delta_object, "delta", AQLM_F32, 2);
    PyArrayObject *h = delta ? float_input(h_object, "h", AQLM_F32, 2) : NULL;
    PyArrayObject *g = h ? inout_array(g_object, "g", NPY_FLOAT32, NPY_FLOAT32, 2) : NULL;
    PyObject *result = NULL;
    float **rows = NULL;
    if (!g) goto done;
    const npy_intp n = PyArray_DIM(delta, 0), ig = PyArray_DIM(delta, 1), width = PyArray_DIM(h, 1);
    if (PyArray_DIM(h, 0) != ig || PyArray_DIM(g, 0) != n || PyArray_DIM(g, 1) != width) {
        PyErr_SetString(PyExc_ValueError, "need delta [n, ig], h [ig, width] and g [n, width]");
        goto done;
    }
    rows = PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(float *));
    if (!rows) {
        PyErr_NoMemory();
        goto done;
    }
    for (npy_intp r = 0; r < n; r++) rows[r] = (float *)PyArray_DATA(g) + r * width;
    const aqlm_kernels *kernels = aqlm_kernels_for(simd);
    Py_BEGIN_ALLOW_THREADS
    kernels->gradient_update(n, ig, width, PyArray_DATA(delta), PyArray_DATA(h), rows);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyMem_Free(rows);
    Py_XDECREF(delta), Py_XDECREF(h), Py_XDECREF(g);
    return result;
}

PyDoc_STRVAR(codeword_norms_doc,
"codeword_norms(ct, ig, h=None, *, simd=None)\n"
"--\n\n"
"Inner loop, exposed for tests: for each codeword c (column of ct [og * ig, K], rows r * ig + i),\n"
"sum over r of w_r h w_r^T (h [ig, ig]) or of |w_r|^2 when h is None, summed in float64.\n"
"Returns norms [K] float32.");

static PyObject *py_codeword_norms(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"ct", "ig", "h", "simd", NULL};
    PyObject *ct_object, *h_object = Py_None;
    Py_ssize_t ig;
    const char *simd_name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On|O$z:codeword_norms", keywords, &ct_object, &ig, &h_object,
                                     &simd_name))
        return NULL;
    aqlm_simd simd;
    if (parse_simd(module, simd_name, &simd) < 0) return NULL;
    PyArrayObject *ct = float_input(ct_object, "ct", AQLM_F32, 2);
    PyArrayObject *h = NULL;
    PyObject *result = NULL;
    if (!ct) goto done;
    if (h_object != Py_None && !(h = float_input(h_object, "h", AQLM_F32, 2))) goto done;
    const npy_intp D = PyArray_DIM(ct, 0), K = PyArray_DIM(ct, 1);
    if (ig < 1 || D % ig != 0 || (h && (PyArray_DIM(h, 0) != ig || PyArray_DIM(h, 1) != ig))) {
        PyErr_Format(PyExc_ValueError, "need ct [og * ig, K] and h [ig, ig] or None; got ct %zdx%zd, ig=%zd",
                     (Py_ssize_t)D, (Py_ssize_t)K, ig);
        goto done;
    }
    npy_intp shape[1] = {K};
    PyArrayObject *norms = (PyArrayObject *)PyArray_SimpleNew(1, shape, NPY_FLOAT32);
    if (!norms) goto done;
    const aqlm_kernels *kernels = aqlm_kernels_for(simd);
    Py_BEGIN_ALLOW_THREADS
    kernels->codeword_norms(0, K, K, D / ig, ig, PyArray_DATA(ct), h ? PyArray_DATA(h) : NULL, ig, PyArray_DATA(norms));
    Py_END_ALLOW_THREADS
    result = (PyObject *)norms;
done:
    Py_XDECREF(ct), Py_XDECREF(h);
    return result;
}

/* ---- one decoding step (decode_step.c) ------------------------------------------------------ */

typedef struct {
    const char *name;
    float *data;
    npy_intp size;
    int writeable;
} step_array;

/* A float32, C-contiguous array of exactly `size` elements (any shape), used in place: never
 * copied, so the kernel's writes land in the caller's array. */
static int step_array_parse(PyObject *object, step_array *a) {
    if (!PyArray_Check(object)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", a->name, Py_TYPE(object)->tp_name);
        return -1;
    }
    PyArrayObject *array = (PyArrayObject *)object;
    if (PyArray_TYPE(array) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32, got %s", a->name, PyArray_DESCR(array)->typeobj->tp_name);
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(array) || (a->writeable && !PyArray_ISWRITEABLE(array))) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous%s", a->name, a->writeable ? " and writeable" : "");
        return -1;
    }
    if (PyArray_SIZE(array) != a->size) {
        PyErr_Format(PyExc_ValueError, "%s must have %zd elements, got %zd", a->name, (Py_ssize_t)a->size,
                     (Py_ssize_t)PyArray_SIZE(array));
        return -1;
    }
    a->data = PyArray_DATA(array);
    return 0;
}

/* Rejects any written array that shares bytes with another array of the call. */
static int step_arrays_disjoint(const step_array *arrays, int count) {
    for (int i = 0; i < count; i++)
        for (int j = 0; j < count; j++) {
            if (i == j || !arrays[i].writeable || !arrays[i].data || !arrays[j].data) continue;
            const char *a0 = (const char *)arrays[i].data, *a1 = a0 + arrays[i].size * sizeof(float);
            const char *b0 = (const char *)arrays[j].data, *b1 = b0 + arrays[j].size * sizeof(float);
            if (a0 < b1 && b0 < a1) {
                PyErr_Format(PyExc_ValueError, "%s must not overlap %s in memory", arrays[i].name, arrays[j].name);
                return -1;
            }
        }
    return 0;
}

/* The arguments of one residual-add-and-norm, SiLU-gate or attention step, checked once: what the
 * single calls below run, and what a step program (further below) holds per step. */
typedef struct {
    npy_intp n;
    float *h, *delta, *weight, *out, eps;
} norm_args;

typedef struct {
    npy_intp n;
    float *gate, *up;
} silu_args;

typedef struct {
    npy_intp heads, kv_heads, D, capacity;
    float *q, *k, *v, *cos, *sin, *keys, *values, *scores, *out, scale;
    int num_threads;
} attend_args;

static int norm_args_parse(PyObject *h_object, PyObject *delta_object, PyObject *weight_object, PyObject *out_object,
                           float eps, norm_args *a) {
    if (!PyArray_Check(h_object)) {
        PyErr_Format(PyExc_TypeError, "h must be a numpy.ndarray, got %s", Py_TYPE(h_object)->tp_name);
        return -1;
    }
    const npy_intp n = PyArray_SIZE((PyArrayObject *)h_object);
    step_array arrays[] = {{"h", NULL, n, 1}, {"delta", NULL, n, 0}, {"weight", NULL, n, 0}, {"out", NULL, n, 1}};
    if (step_array_parse(h_object, &arrays[0]) < 0 ||
        (delta_object != Py_None && step_array_parse(delta_object, &arrays[1]) < 0) ||
        step_array_parse(weight_object, &arrays[2]) < 0 || step_array_parse(out_object, &arrays[3]) < 0 ||
        step_arrays_disjoint(arrays, 4) < 0)
        return -1;
    *a = (norm_args){.n = n, .h = arrays[0].data, .delta = arrays[1].data, .weight = arrays[2].data,
                     .out = arrays[3].data, .eps = eps};
    return 0;
}

static int silu_args_parse(PyObject *gate_object, PyObject *up_object, silu_args *a) {
    if (!PyArray_Check(gate_object)) {
        PyErr_Format(PyExc_TypeError, "gate must be a numpy.ndarray, got %s", Py_TYPE(gate_object)->tp_name);
        return -1;
    }
    const npy_intp n = PyArray_SIZE((PyArrayObject *)gate_object);
    step_array arrays[] = {{"gate", NULL, n, 1}, {"up", NULL, n, 0}};
    if (step_array_parse(gate_object, &arrays[0]) < 0 || step_array_parse(up_object, &arrays[1]) < 0 ||
        step_arrays_disjoint(arrays, 2) < 0)
        return -1;
    *a = (silu_args){.n = n, .gate = arrays[0].data, .up = arrays[1].data};
    return 0;
}

/* objects: q, k, v, cos, sin, keys, values, scores, out */
static int attend_args_parse(PyObject *objects[9], long long heads, long long kv_heads, float scale, int num_threads,
                             attend_args *a) {
    if (!PyArray_Check(objects[3]) || PyArray_NDIM((PyArrayObject *)objects[3]) != 2) {
        PyErr_SetString(PyExc_ValueError, "cos must be a 2-D numpy.ndarray [capacity, head_dim]");
        return -1;
    }
    const npy_intp capacity = PyArray_DIM((PyArrayObject *)objects[3], 0), D = PyArray_DIM((PyArrayObject *)objects[3], 1);
    if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0) {
        PyErr_Format(PyExc_ValueError, "heads (%lld) must be a positive multiple of kv_heads (%lld)", heads, kv_heads);
        return -1;
    }
    if (check_threads(num_threads) < 0) return -1;
    step_array arrays[] = {
        {"q", NULL, heads * D, 1},         {"k", NULL, kv_heads * D, 1},   {"v", NULL, kv_heads * D, 0},
        {"cos", NULL, capacity * D, 0},    {"sin", NULL, capacity * D, 0}, {"keys", NULL, capacity * kv_heads * D, 1},
        {"values", NULL, capacity * kv_heads * D, 1}, {"scores", NULL, heads * capacity, 1}, {"out", NULL, heads * D, 1},
    };
    for (int i = 0; i < 9; i++)
        if (step_array_parse(objects[i], &arrays[i]) < 0) return -1;
    if (step_arrays_disjoint(arrays, 9) < 0) return -1;
    *a = (attend_args){.heads = heads, .kv_heads = kv_heads, .D = D, .capacity = capacity, .q = arrays[0].data,
                       .k = arrays[1].data, .v = arrays[2].data, .cos = arrays[3].data, .sin = arrays[4].data,
                       .keys = arrays[5].data, .values = arrays[6].data, .scores = arrays[7].data,
                       .out = arrays[8].data, .scale = scale, .num_threads = num_threads};
    return 0;
}

static aqlm_status norm_run(const norm_args *a, aqlm_error *err) {
    return aqlm_residual_rms_norm(a->n, a->h, a->delta, a->weight, a->eps, a->out, err);
}

static aqlm_status silu_run(const silu_args *a, aqlm_error *err) { return aqlm_silu_mul(a->n, a->gate, a->up, err); }

static aqlm_status attend_run(const attend_args *a, int64_t position, aqlm_error *err) {
    return aqlm_attend_one(a->heads, a->kv_heads, a->D, a->capacity, position, a->q, a->k, a->v, a->cos, a->sin,
                           a->scale, a->keys, a->values, a->scores, a->out, a->num_threads, err);
}

PyDoc_STRVAR(residual_rms_norm_doc,
"residual_rms_norm(h, delta, weight, out, *, eps)\n--\n\n"
"With delta (not None): h += delta, in place. Then out = weight * h / sqrt(mean(h**2) + eps).\n"
"All float32, C-contiguous, with the same number of elements.");
static PyObject *py_residual_rms_norm(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"h", "delta", "weight", "out", "eps", NULL};
    PyObject *h_object, *delta_object, *weight_object, *out_object;
    float eps;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO$f:residual_rms_norm", keywords, &h_object, &delta_object,
                                     &weight_object, &out_object, &eps))
        return NULL;
    norm_args a;
    if (norm_args_parse(h_object, delta_object, weight_object, out_object, eps, &a) < 0) return NULL;
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = norm_run(&a, &err);
    Py_END_ALLOW_THREADS
    return none_or_raise(status, &err);
}

PyDoc_STRVAR(silu_mul_doc,
"silu_mul(gate, up)\n--\n\ngate = silu(gate) * up, in place; float32, C-contiguous, the same number of elements.");
static PyObject *py_silu_mul(PyObject *module, PyObject *args) {
    PyObject *gate_object, *up_object;
    if (!PyArg_ParseTuple(args, "OO:silu_mul", &gate_object, &up_object)) return NULL;
    silu_args a;
    if (silu_args_parse(gate_object, up_object, &a) < 0) return NULL;
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = silu_run(&a, &err);
    Py_END_ALLOW_THREADS
    return none_or_raise(status, &err);
}

PyDoc_STRVAR(attend_one_doc,
"attend_one(q, k, v, cos, sin, keys, values, scores, out, *, heads, kv_heads, position, scale, num_threads)\n--\n\n"
"One token's attention at `position` (see aqlm_attend_one in aqlm.h): rotates q [heads, D] and\n"
"k [kv_heads, D] in place, stores k and v at row `position` of keys and values [capacity, kv_heads, D],\n"
"and writes softmax(scale q K^T) V over rows 0..position into out [heads, D]. cos and sin: [capacity, D];\n"
"scores: heads * capacity floats of work space. All float32 and C-contiguous. Up to num_threads threads\n"
"split the heads once the cache is long; the result does not depend on their number.");
static PyObject *py_attend_one(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"q", "k", "v", "cos", "sin", "keys", "values", "scores", "out", "heads", "kv_heads",
                               "position", "scale", "num_threads", NULL};
    PyObject *objects[9];
    long long heads, kv_heads, position;
    float scale;
    int num_threads;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOO$LLLfi:attend_one", keywords, &objects[0], &objects[1],
                                     &objects[2], &objects[3], &objects[4], &objects[5], &objects[6], &objects[7],
                                     &objects[8], &heads, &kv_heads, &position, &scale, &num_threads))
        return NULL;
    attend_args a;
    if (attend_args_parse(objects, heads, kv_heads, scale, num_threads, &a) < 0) return NULL;
    aqlm_error err;
    aqlm_status status;
    Py_BEGIN_ALLOW_THREADS
    status = attend_run(&a, position, &err);
    Py_END_ALLOW_THREADS
    return none_or_raise(status, &err);
}

/* ---- step programs: a whole decoding step in one C call -------------------------------------- */

/* One step of a program: a bound linear on x and out, a norm, a SiLU gate or an attention step. */
typedef enum { STEP_LINEAR, STEP_NORM, STEP_SILU, STEP_ATTEND } step_kind;

typedef struct {
    step_kind kind;
    union {
        struct {
            bound_matmul *bound;
            const char *x;
            char *out;
            const char *cache;    /* NULL, or the keys or values of the attention step after it, */
            int64_t row_bytes;    /* whose rows before the step's position it prefetches */
            int together;         /* linear steps from this one run as one (join_lutq_linears); 0: run by an earlier one */
        } linear;
        norm_args norm;
        silu_args silu;
        attend_args attend;
    } as;
} program_step;

typedef struct {
    Py_ssize_t count;
    program_step *steps;
    npy_intp capacity; /* the smallest attention cache of the program (positions must lie below); -1: none */
    PyObject *held;    /* every object the steps point into */
} step_program;

static const char STEP_PROGRAM_CAPSULE[] = "aqlm._C.step_program";

static void step_program_free(PyObject *capsule) {
    step_program *p = PyCapsule_GetPointer(capsule, STEP_PROGRAM_CAPSULE);
    if (p == NULL) return;
    Py_XDECREF(p->held);
    PyMem_Free(p->steps);
    PyMem_Free(p);
}

/* A bound linear's step: float32 activations x and out of exactly the bound sizes, out apart from x and the weight. */
static int linear_step_parse(PyObject *spec, program_step *step) {
    PyObject *capsule, *x_object, *out_object;
    const char *kind;
    if (!PyArg_ParseTuple(spec, "sOOO:linear step", &kind, &capsule, &x_object, &out_object)) return -1;
    bound_matmul *b = PyCapsule_GetPointer(capsule, BOUND_MATMUL_CAPSULE);
    if (b == NULL) return -1;
    if (b->x_dtype != AQLM_F32) {
        PyErr_SetString(PyExc_ValueError, "a step program's linears take float32 activations");
        return -1;
    }
    step_array arrays[] = {{"x", NULL, (npy_intp)(b->x_bytes / sizeof(float)), 0},
                           {"out", NULL, (npy_intp)(b->out_bytes / sizeof(float)), 1}};
    if (step_array_parse(x_object, &arrays[0]) < 0 || step_array_parse(out_object, &arrays[1]) < 0 ||
        step_arrays_disjoint(arrays, 2) < 0 || check_out_apart_from_weight(b, (const char *)arrays[1].data) < 0)
        return -1;
    step->kind = STEP_LINEAR;
    step->as.linear.bound = b, step->as.linear.x = (const char *)arrays[0].data, step->as.linear.out = (char *)arrays[1].data;
    step->as.linear.cache = NULL, step->as.linear.row_bytes = 0, step->as.linear.together = 1;
    return 0;
}

static int program_step_parse(PyObject *spec, program_step *step, npy_intp *capacity) {
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 1 || !PyUnicode_Check(PyTuple_GET_ITEM(spec, 0))) {
        PyErr_Format(PyExc_TypeError, "each step must be a tuple starting with its kind ('linear', 'norm', 'silu' or "
                                      "'attend'), got %s", Py_TYPE(spec)->tp_name);
        return -1;
    }
    const char *kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(spec, 0));
    if (kind == NULL) return -1;
    if (strcmp(kind, "linear") == 0) return linear_step_parse(spec, step);
    if (strcmp(kind, "norm") == 0) {
        PyObject *h, *delta, *weight, *out;
        float eps;
        if (!PyArg_ParseTuple(spec, "sOOOOf:norm step", &kind, &h, &delta, &weight, &out, &eps)) return -1;
        step->kind = STEP_NORM;
        return norm_args_parse(h, delta, weight, out, eps, &step->as.norm);
    }
    if (strcmp(kind, "silu") == 0) {
        PyObject *gate, *up;
        if (!PyArg_ParseTuple(spec, "sOO:silu step", &kind, &gate, &up)) return -1;
        step->kind = STEP_SILU;
        return silu_args_parse(gate, up, &step->as.silu);
    }
    if (strcmp(kind, "attend") == 0) {
        PyObject *objects[9];
        long long heads, kv_heads;
        float scale;
        int num_threads;
        if (!PyArg_ParseTuple(spec, "sOOOOOOOOOLLfi:attend step", &kind, &objects[0], &objects[1], &objects[2],
                              &objects[3], &objects[4], &objects[5], &objects[6], &objects[7], &objects[8], &heads,
                              &kv_heads, &scale, &num_threads))
            return -1;
        step->kind = STEP_ATTEND;
        if (attend_args_parse(objects, heads, kv_heads, scale, num_threads, &step->as.attend) < 0) return -1;
        if (*capacity < 0 || step->as.attend.capacity < *capacity) *capacity = step->as.attend.capacity;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "a step's kind must be 'linear', 'norm', 'silu' or 'attend', got '%s'", kind);
    return -1;
}

/* The attention cache an attention step reads (every row before its position) is far from the
 * cores by then: a step's other layers have streamed their weights through the caches since.
 * So the third and second linear before each attention step (a Llama layer's q and k
 * projections) prefetch its keys and its values, spread over their table builds. */
static void link_attention_caches(program_step *steps, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        if (steps[i].kind != STEP_ATTEND) continue;
        const attend_args *a = &steps[i].as.attend;
        const int64_t row_bytes = (int64_t)(a->kv_heads * a->D) * (int64_t)sizeof(float);
        Py_ssize_t before = 0;
        for (Py_ssize_t j = i - 1; j >= 0 && steps[j].kind != STEP_ATTEND && before < 3; j--) {
            if (steps[j].kind != STEP_LINEAR) continue;
            if (++before < 2) continue;
            steps[j].as.linear.cache = (const char *)(before == 3 ? a->keys : a->values);
            steps[j].as.linear.row_bytes = row_bytes;
        }
    }
}

/* Whether a linear step can run in one parallel region with the earlier linear steps first..last - 1
 * (aqlm_lutq_matmul_many): all quantized tables of one pass, on the same x, thread count and SIMD
 * level, its out apart from their outs and weights and theirs apart from its weight (each out is
 * apart from x and its own weight already). */
/* A linear step on quantized tables whose tokens take one pass (what aqlm_lutq_matmul_many runs). */
static int one_pass_lutq_linear(const program_step *step) {
    return step->kind == STEP_LINEAR && step->as.linear.bound->kind == BOUND_LUTQ &&
           step->as.linear.bound->tokens <= AQLM_LUTQ_MAX_TOKENS;
}

static int joins_lutq_linears(const program_step *steps, Py_ssize_t first, Py_ssize_t last) {
    const program_step *step = &steps[last];
    if (!one_pass_lutq_linear(step) || last - first >= AQLM_LUTQ_MAX_CALLS) return 0;
    const bound_matmul *b = step->as.linear.bound, *a = steps[first].as.linear.bound;
    if (step->as.linear.x != steps[first].as.linear.x || b->num_threads != a->num_threads || b->simd != a->simd)
        return 0;
    for (Py_ssize_t i = first; i < last; i++) {
        const bound_matmul *other = steps[i].as.linear.bound;
        const char *out = steps[i].as.linear.out;
        if (ranges_overlap(step->as.linear.out, b->out_bytes, out, out + other->out_bytes) ||
            overlaps_weight(other, step->as.linear.out, b->out_bytes) || overlaps_weight(b, out, other->out_bytes))
            return 0;
    }
    return 1;
}

/* Runs of linear steps on the same x (a Llama layer's q, k and v projections; its gate and up
 * projections) run as one: one parallel region and one barrier for the run, where each linear
 * alone takes a region and a barrier of its own, and the threads wait at every barrier for the
 * last to arrive (SmolLM2 2x8g8 on 2 cores: ~20% of a linear's time went to entering its region,
 * the barrier and the join). */
static void join_lutq_linears(program_step *steps, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count;) {
        Py_ssize_t end = i + 1;
        if (one_pass_lutq_linear(&steps[i]))
            while (end < count && joins_lutq_linears(steps, i, end)) end++;
        if (end - i > 1) {
            steps[i].as.linear.together = (int)(end - i);
            for (Py_ssize_t j = i + 1; j < end; j++) steps[j].as.linear.together = 0;
        }
        i = end;
    }
}

/* The linear steps steps[0..count - 1], joined by join_lutq_linears, at cache row `position`. */
static aqlm_status lutq_linears_run(const program_step *steps, int count, long long position, aqlm_error *err) {
    aqlm_lutq_call calls[AQLM_LUTQ_MAX_CALLS];
    aqlm_lutq_next nexts[AQLM_LUTQ_MAX_CALLS];
    int mine[AQLM_LUTQ_MAX_CALLS];
    for (int i = 0; i < count; i++)
        calls[i] = bound_lutq_call(steps[i].as.linear.bound, steps[i].as.linear.x, steps[i].as.linear.out, &nexts[i],
                                   steps[i].as.linear.cache, steps[i].as.linear.row_bytes * position, &mine[i]);
    const bound_matmul *first = steps[0].as.linear.bound;
    const aqlm_status status = aqlm_lutq_matmul_many(count, calls, first->simd, first->num_threads, err);
    for (int i = 0; i < count; i++) bound_lutq_release(steps[i].as.linear.bound, mine[i]);
    return status;
}

PyDoc_STRVAR(bind_step_program_doc,
"bind_step_program(steps)\n"
"--\n\n"
"A program of decoding-step calls, checked now, for run_step_program to run in one C call. Each\n"
"step is a tuple: ('linear', bound, x, out) with a bind_matmul call on float32 arrays x and out;\n"
"('norm', h, delta, weight, out, eps) as residual_rms_norm; ('silu', gate, up) as silu_mul;\n"
"('attend', q, k, v, cos, sin, keys, values, scores, out, heads, kv_heads, scale, num_threads) as\n"
"attend_one, at the position given to run_step_program. Arrays are used in place; the program holds them.");

static PyObject *py_bind_step_program(PyObject *module, PyObject *specs) {
    PyObject *sequence = PySequence_Check(specs) ? PySequence_Tuple(specs) : NULL; /* a copy the caller cannot change */
    if (sequence == NULL) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "steps must be a sequence of tuples, got %s", Py_TYPE(specs)->tp_name);
        return NULL;
    }
    const Py_ssize_t count = PyTuple_GET_SIZE(sequence);
    step_program *p = PyMem_Calloc(1, sizeof *p);
    program_step *steps = PyMem_Calloc(count > 0 ? (size_t)count : 1, sizeof *steps);
    if (p == NULL || steps == NULL) {
        PyMem_Free(p), PyMem_Free(steps), Py_DECREF(sequence);
        return PyErr_NoMemory();
    }
    *p = (step_program){.count = count, .steps = steps, .capacity = -1, .held = sequence};
    for (Py_ssize_t i = 0; i < count; i++)
        if (program_step_parse(PyTuple_GET_ITEM(sequence, i), &steps[i], &p->capacity) < 0) {
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyErr_Format(type ? type : PyExc_ValueError, "step %zd: %S", i, value ? value : Py_None);
            Py_XDECREF(type), Py_XDECREF(value), Py_XDECREF(traceback);
            Py_DECREF(sequence), PyMem_Free(steps), PyMem_Free(p);
            return NULL;
        }
    link_attention_caches(steps, count);
    join_lutq_linears(steps, count);
    PyObject *capsule = PyCapsule_New(p, STEP_PROGRAM_CAPSULE, step_program_free);
    if (capsule == NULL) Py_DECREF(sequence), PyMem_Free(steps), PyMem_Free(p);
    return capsule;
}

PyDoc_STRVAR(step_program_runs_doc,
"step_program_runs(program)\n"
"--\n\n"
"The steps of a bind_step_program program as they run: a tuple with, for each run, how many steps\n"
"it takes (linear steps on the same x that run in one parallel region take several; any other\n"
"step one).");

static PyObject *py_step_program_runs(PyObject *module, PyObject *capsule) {
    const step_program *p = PyCapsule_GetPointer(capsule, STEP_PROGRAM_CAPSULE);
    if (p == NULL) return NULL;
    PyObject *runs = PyList_New(0);
    for (Py_ssize_t i = 0; runs != NULL && i < p->count; i++) {
        const program_step *step = &p->steps[i];
        const long steps = step->kind == STEP_LINEAR ? step->as.linear.together : 1;
        if (steps == 0) continue;
        PyObject *value = PyLong_FromLong(steps);
        if (value == NULL || PyList_Append(runs, value) < 0) Py_CLEAR(runs);
        Py_XDECREF(value);
    }
    if (runs == NULL) return NULL;
    PyObject *result = PyList_AsTuple(runs);
    Py_DECREF(runs);
    return result;
}

PyDoc_STRVAR(run_step_program_doc,
"run_step_program(program, position)\n"
"--\n\n"
"Runs every step of a bind_step_program program in order, attention at cache row `position`, with\n"
"the GIL released once. Stops at the first failing step and raises its error.");

static PyObject *py_run_step_program(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "run_step_program takes 2 arguments (program, position), got %zd", nargs);
        return NULL;
    }
    const step_program *p = PyCapsule_GetPointer(args[0], STEP_PROGRAM_CAPSULE);
    if (p == NULL) return NULL;
    const long long position = PyLong_AsLongLong(args[1]);
    if (position == -1 && PyErr_Occurred()) return NULL;
    if (position < 0 || (p->capacity >= 0 && position >= p->capacity)) {
        PyErr_Format(PyExc_ValueError, "position %lld is outside the cache of %lld positions", position,
                     (long long)p->capacity);
        return NULL;
    }
    aqlm_error err;
    aqlm_status status = AQLM_OK;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < p->count && status == AQLM_OK; i++) {
        const program_step *step = &p->steps[i];
        switch (step->kind) {
        case STEP_LINEAR: {
            if (step->as.linear.together == 0) break; /* run with an earlier step */
            if (step->as.linear.together > 1) {
                status = lutq_linears_run(step, step->as.linear.together, position, &err);
                break;
            }
            bound_matmul *b = step->as.linear.bound;
            status = bound_matmul_run(b, step->as.linear.x, step->as.linear.out, step->as.linear.cache,
                                      step->as.linear.row_bytes * position, &err);
            break;
        }
        case STEP_NORM: status = norm_run(&step->as.norm, &err); break;
        case STEP_SILU: status = silu_run(&step->as.silu, &err); break;
        case STEP_ATTEND: status = attend_run(&step->as.attend, position, &err); break;
        }
    }
    Py_END_ALLOW_THREADS
    return none_or_raise(status, &err);
}

PyDoc_STRVAR(simd_supported_doc, "simd_supported()\n--\n\nThe best SIMD level this CPU, OS and build support.");
static PyObject *py_simd_supported(PyObject *module, PyObject *unused) {
    return PyUnicode_FromString(aqlm_simd_name(state_of(module)->supported));
}

PyDoc_STRVAR(simd_default_doc, "simd_default()\n--\n\nThe SIMD level used when a call names none (AQLM_SIMD or the best supported).");
static PyObject *py_simd_default(PyObject *module, PyObject *unused) {
    return PyUnicode_FromString(aqlm_simd_name(state_of(module)->chosen));
}

PyDoc_STRVAR(getenv_each_doc,
"getenv_each(names)\n--\n\n"
"The process environment's value (str) or None for each name of the tuple `names`, read with\n"
"getenv: what os.environ holds, since os.environ writes through putenv/unsetenv. One call for\n"
"the variables an inference call depends on, instead of one os.environ lookup each.");
static PyObject *py_getenv_each(PyObject *module, PyObject *names) {
    if (!PyTuple_Check(names)) {
        PyErr_Format(PyExc_TypeError, "names must be a tuple of str, got %s", Py_TYPE(names)->tp_name);
        return NULL;
    }
    const Py_ssize_t count = PyTuple_GET_SIZE(names);
    PyObject *values = PyTuple_New(count);
    if (values == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        const char *utf8 = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
        if (utf8 == NULL) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "names[%zd] must be a str, got %s", i, Py_TYPE(name)->tp_name);
            Py_DECREF(values);
            return NULL;
        }
        const char *value = getenv(utf8);
        PyObject *item = Py_None;
        if (value == NULL)
            Py_INCREF(item);
        else
            item = PyUnicode_DecodeFSDefault(value);
        if (item == NULL) {
            Py_DECREF(values);
            return NULL;
        }
        PyTuple_SET_ITEM(values, i, item);
    }
    return values;
}

PyDoc_STRVAR(set_min_parallel_work_doc,
"set_min_parallel_work(work)\n--\n\n"
"Calls start a thread team only for at least `work` elementary operations (default 262144);\n"
"0 always uses the threads asked for. Process-wide; results never depend on it.");
static PyObject *py_set_min_parallel_work(PyObject *module, PyObject *arg) {
    const long long work = PyLong_AsLongLong(arg);
    if (work == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "work must be an int, got %s", Py_TYPE(arg)->tp_name);
        }
        return NULL;
    }
    if (work < 0) return PyErr_Format(PyExc_ValueError, "work must be >= 0, got %lld", work);
    aqlm_set_min_parallel_work((int64_t)work);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(min_parallel_work_doc, "min_parallel_work()\n--\n\nThe threshold set by set_min_parallel_work.");
static PyObject *py_min_parallel_work(PyObject *module, PyObject *unused) {
    return PyLong_FromLongLong((long long)aqlm_min_parallel_work());
}

PyDoc_STRVAR(parallel_team_size_doc,
"parallel_team_size(num_threads)\n--\n\n"
"For tests: the number of threads OpenMP gives a parallel region that asks for num_threads.");
static PyObject *py_parallel_team_size(PyObject *module, PyObject *arg) {
    const int num_threads = (int)PyLong_AsLong(arg);
    if (num_threads == -1 && PyErr_Occurred()) return NULL;
    if (check_threads(num_threads) < 0) return NULL;
    int size = 0;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp single
        size = omp_get_num_threads();
    }
    return PyLong_FromLong(size);
}

static PyMethodDef methods[] = {
    {"dequantize", (PyCFunction)(void (*)(void))py_dequantize, METH_VARARGS | METH_KEYWORDS, dequantize_doc},
    {"lut_matmul", (PyCFunction)(void (*)(void))py_lut_matmul, METH_VARARGS | METH_KEYWORDS, lut_matmul_doc},
    {"codebook_matmul", (PyCFunction)(void (*)(void))py_codebook_matmul, METH_VARARGS | METH_KEYWORDS, codebook_matmul_doc},
    {"decodeq_prepare", (PyCFunction)(void (*)(void))py_decodeq_prepare, METH_VARARGS | METH_KEYWORDS, decodeq_prepare_doc},
    {"decodeq_matmul", (PyCFunction)(void (*)(void))py_decodeq_matmul, METH_VARARGS | METH_KEYWORDS, decodeq_matmul_doc},
    {"lutq_pack_codes", (PyCFunction)(void (*)(void))py_lutq_pack_codes, METH_VARARGS | METH_KEYWORDS, lutq_pack_codes_doc},
    {"lutq_packed_size", py_lutq_packed_size, METH_VARARGS, lutq_packed_size_doc},
    {"lutq_prepare_codebooks", (PyCFunction)(void (*)(void))py_lutq_prepare_codebooks, METH_VARARGS | METH_KEYWORDS,
     lutq_prepare_codebooks_doc},
    {"lutq_matmul", (PyCFunction)(void (*)(void))py_lutq_matmul, METH_VARARGS | METH_KEYWORDS, lutq_matmul_doc},
    {"lutq_kernel", (PyCFunction)(void (*)(void))py_lutq_kernel, METH_VARARGS | METH_KEYWORDS, lutq_kernel_doc},
    {"lutw_matmul", (PyCFunction)(void (*)(void))py_lutw_matmul, METH_VARARGS | METH_KEYWORDS, lutw_matmul_doc},
    {"bind_matmul", (PyCFunction)(void (*)(void))py_bind_matmul, METH_VARARGS | METH_KEYWORDS, bind_matmul_doc},
    {"run_bound_matmul", (PyCFunction)(void (*)(void))py_run_bound_matmul, METH_FASTCALL, run_bound_matmul_doc},
    {"bind_next", (PyCFunction)(void (*)(void))py_bind_next, METH_FASTCALL, bind_next_doc},
    {"bind_step_program", py_bind_step_program, METH_O, bind_step_program_doc},
    {"run_step_program", (PyCFunction)(void (*)(void))py_run_step_program, METH_FASTCALL, run_step_program_doc},
    {"step_program_runs", py_step_program_runs, METH_O, step_program_runs_doc},
    {"bf16_matmul", (PyCFunction)(void (*)(void))py_bf16_matmul, METH_VARARGS | METH_KEYWORDS, bf16_matmul_doc},
    {"bf16_prepare", (PyCFunction)(void (*)(void))py_bf16_prepare, METH_VARARGS | METH_KEYWORDS, bf16_prepare_doc},
    {"bf16_kernel", (PyCFunction)(void (*)(void))py_bf16_kernel, METH_VARARGS | METH_KEYWORDS, bf16_kernel_doc},
    {"decodeq_kernel", (PyCFunction)(void (*)(void))py_decodeq_kernel, METH_VARARGS | METH_KEYWORDS, decodeq_kernel_doc},
    {"lutw_kernel", (PyCFunction)(void (*)(void))py_lutw_kernel, METH_VARARGS | METH_KEYWORDS, lutw_kernel_doc},
    {"int8_matmul", (PyCFunction)(void (*)(void))py_int8_matmul, METH_VARARGS | METH_KEYWORDS, int8_matmul_doc},
    {"int8_quantize_rows", (PyCFunction)(void (*)(void))py_int8_quantize_rows, METH_VARARGS | METH_KEYWORDS, int8_quantize_rows_doc},
    {"kmeans", (PyCFunction)(void (*)(void))py_kmeans, METH_VARARGS | METH_KEYWORDS, kmeans_doc},
    {"beam_search", (PyCFunction)(void (*)(void))py_beam_search, METH_VARARGS | METH_KEYWORDS, beam_search_doc},
    {"topk_scores", (PyCFunction)(void (*)(void))py_topk_scores, METH_VARARGS | METH_KEYWORDS, topk_scores_doc},
    {"gradient_update", (PyCFunction)(void (*)(void))py_gradient_update, METH_VARARGS | METH_KEYWORDS, gradient_update_doc},
    {"codeword_norms", (PyCFunction)(void (*)(void))py_codeword_norms, METH_VARARGS | METH_KEYWORDS, codeword_norms_doc},
    {"residual_rms_norm", (PyCFunction)(void (*)(void))py_residual_rms_norm, METH_VARARGS | METH_KEYWORDS, residual_rms_norm_doc},
    {"silu_mul", py_silu_mul, METH_VARARGS, silu_mul_doc},
    {"attend_one", (PyCFunction)(void (*)(void))py_attend_one, METH_VARARGS | METH_KEYWORDS, attend_one_doc},
    {"simd_supported", py_simd_supported, METH_NOARGS, simd_supported_doc},
    {"simd_default", py_simd_default, METH_NOARGS, simd_default_doc},
    {"getenv_each", py_getenv_each, METH_O, getenv_each_doc},
    {"set_min_parallel_work", py_set_min_parallel_work, METH_O, set_min_parallel_work_doc},
    {"min_parallel_work", py_min_parallel_work, METH_NOARGS, min_parallel_work_doc},
    {"parallel_team_size", py_parallel_team_size, METH_O, parallel_team_size_doc},
    {NULL, NULL, 0, NULL},
};

/* ---- module ---------------------------------------------------------------------------------- */

static int module_exec(PyObject *module) {
    import_array1(-1);
    module_state *state = state_of(module);
    const aqlm_simd cpu = aqlm_simd_supported(), built = aqlm_simd_compiled();
    state->supported = cpu < built ? cpu : built;
    state->chosen = state->supported;
    const char *requested = getenv("AQLM_SIMD");
    if (requested != NULL && requested[0] != '\0') {
        aqlm_error err;
        aqlm_simd level;
        if (aqlm_simd_parse(requested, &level, &err) != AQLM_OK) {
            PyErr_Format(PyExc_ImportError, "environment variable AQLM_SIMD: %s", err.message);
            return -1;
        }
        if (level > state->supported) {
            PyErr_Format(PyExc_ImportError, "environment variable AQLM_SIMD=%s: this CPU and build support up to '%s'",
                         requested, aqlm_simd_name(state->supported));
            return -1;
        }
        state->chosen = level;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, (void *)module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aqlm._C",
    .m_doc = "The AQLM C core: quantized matmul, dequantization, k-means and beam search.",
    .m_size = sizeof(module_state),
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&module_def); }
