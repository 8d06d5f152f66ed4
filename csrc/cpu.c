/*
 * cpu.c - which SIMD level this CPU and OS support, and the kernel table for a level.
 *
 * CPUID says what the CPU implements; XGETBV says whether the OS saves the wide registers on a
 * context switch. Both must agree before AVX code may run, or a thread switch corrupts state.
 */
#include <ctype.h>
#include <stdlib.h>

#include "bf16tile.h"
#include "decodeq.h"
#include "int8.h"
#include "lutq.h"
#include "lutw.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t read_xcr0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

aqlm_simd aqlm_simd_supported(void) {
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return AQLM_SIMD_SCALAR;
    const int osxsave = (ecx >> 27) & 1, avx = (ecx >> 28) & 1, fma = (ecx >> 12) & 1;
    const int f16c = (ecx >> 29) & 1;
    if (!(osxsave && avx && fma && f16c)) return AQLM_SIMD_SCALAR;
    const uint64_t xcr0 = read_xcr0();
    if ((xcr0 & 0x6) != 0x6) return AQLM_SIMD_SCALAR; /* XMM and YMM state */
    if (__get_cpuid_max(0, NULL) < 7) return AQLM_SIMD_SCALAR;
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    if (!((ebx >> 5) & 1)) return AQLM_SIMD_SCALAR; /* AVX2 */
    const int avx512 = ((ebx >> 16) & 1) && ((ebx >> 17) & 1) && ((ebx >> 30) & 1) && ((ebx >> 31) & 1);
    if (avx512 && (xcr0 & 0xe6) == 0xe6) return AQLM_SIMD_AVX512; /* opmask, ZMM state */
    return AQLM_SIMD_AVX2;
}

/* AVX-512 VBMI (byte permutes) and VNNI (the tables' integer products), asked of the CPU model libgcc reads once at load time (no CPUID
 * per call: in a virtual machine each CPUID traps to the hypervisor). Callers have already
 * checked the AVX-512 level, which includes the OS's ZMM state. */
static int cpu_has_vbmi(void) { return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni"); }
/* Intel's gathers load 8 qwords at about the pace of single loads; AMD Zen 4's were slower. */
static int cpu_is_intel_with_vnni(void) { return __builtin_cpu_is("intel") && __builtin_cpu_supports("avx512vnni"); }
#else
aqlm_simd aqlm_simd_supported(void) { return AQLM_SIMD_SCALAR; }
static int cpu_has_vbmi(void) { return 0; }
static int cpu_is_intel_with_vnni(void) { return 0; }
#endif

const char *aqlm_simd_name(aqlm_simd level) {
    switch (level) {
    case AQLM_SIMD_AVX2: return "avx2";
    case AQLM_SIMD_AVX512: return "avx512";
    default: return "scalar";
    }
}

aqlm_status aqlm_simd_parse(const char *name, aqlm_simd *level, aqlm_error *err) {
    char lower[16] = {0};
    size_t length = strlen(name);
    AQLM_CHECK(err, length < sizeof lower, "unknown SIMD level '%s': expected scalar, avx2 or avx512", name);
    for (size_t i = 0; i < length; i++) lower[i] = (char)tolower((unsigned char)name[i]);
    for (int candidate = AQLM_SIMD_SCALAR; candidate <= AQLM_SIMD_AVX512; candidate++) {
        if (strcmp(lower, aqlm_simd_name((aqlm_simd)candidate)) == 0) {
            *level = (aqlm_simd)candidate;
            return AQLM_OK;
        }
    }
    AQLM_CHECK(err, 0, "unknown SIMD level '%s': expected scalar, avx2 or avx512", name);
}

aqlm_simd aqlm_simd_compiled(void) {
    if (aqlm_kernels_avx512.level == AQLM_SIMD_AVX512) return AQLM_SIMD_AVX512;
    if (aqlm_kernels_avx2.level == AQLM_SIMD_AVX2) return AQLM_SIMD_AVX2;
    return AQLM_SIMD_SCALAR;
}

const aqlm_kernels *aqlm_kernels_for(aqlm_simd level) {
    /* A table built without its instruction set carries level SCALAR and is never chosen. */
    if (level >= AQLM_SIMD_AVX512 && aqlm_kernels_avx512.level == AQLM_SIMD_AVX512) return &aqlm_kernels_avx512;
    if (level >= AQLM_SIMD_AVX2 && aqlm_kernels_avx2.level == AQLM_SIMD_AVX2) return &aqlm_kernels_avx2;
    return &aqlm_kernels_scalar;
}

const aqlm_lutq_kernels *aqlm_lutq_kernels_for(aqlm_simd level) {
    /* Without VBMI (e.g. Skylake-X) the AVX-512 level uses the AVX2 byte-shuffle kernels. */
    if (level >= AQLM_SIMD_AVX512 && aqlm_lutq_kernels_avx512vbmi.name != NULL && cpu_has_vbmi())
        return &aqlm_lutq_kernels_avx512vbmi;
    if (level >= AQLM_SIMD_AVX2 && aqlm_lutq_kernels_avx2.name != NULL) return &aqlm_lutq_kernels_avx2;
    return &aqlm_lutq_kernels_scalar;
}

const char *aqlm_lutq_kernel_name(aqlm_simd level) { return aqlm_lutq_kernels_for(level)->name; }

const aqlm_lutw_kernels *aqlm_lutw_kernels_for(aqlm_simd level) {
    if (level >= AQLM_SIMD_AVX512 && aqlm_lutw_kernels_avx512.name != NULL) return &aqlm_lutw_kernels_avx512;
    if (level >= AQLM_SIMD_AVX2 && aqlm_lutw_kernels_avx2.name != NULL) return &aqlm_lutw_kernels_avx2;
    return &aqlm_lutw_kernels_scalar;
}

const char *aqlm_lutw_kernel_name(aqlm_simd level) { return aqlm_lutw_kernels_for(level)->name; }

const aqlm_bf16_kernels *aqlm_bf16_kernels_for(aqlm_simd level) {
    if (level < AQLM_SIMD_AVX512) return &aqlm_bf16_kernels_scalar;
    if (aqlm_bf16_kernels_amx.name != NULL && aqlm_bf16_amx_usable()) return &aqlm_bf16_kernels_amx;
    if (aqlm_bf16_kernels_avx512bf16.name != NULL && aqlm_bf16_cpu_has_avx512bf16()) return &aqlm_bf16_kernels_avx512bf16;
    return &aqlm_bf16_kernels_scalar;
}

const char *aqlm_bf16_kernel_name(aqlm_simd level) { return aqlm_bf16_kernels_for(level)->name; }

const aqlm_int8_kernels *aqlm_int8_kernels_for(aqlm_simd level) {
    if (level >= AQLM_SIMD_AVX512 && aqlm_int8_kernels_avx512.level == AQLM_SIMD_AVX512) return &aqlm_int8_kernels_avx512;
    if (level >= AQLM_SIMD_AVX2 && aqlm_int8_kernels_avx2.level == AQLM_SIMD_AVX2) return &aqlm_int8_kernels_avx2;
    return &aqlm_int8_kernels_scalar;
}

const char *aqlm_decodeq_kernel_name(aqlm_simd level, int64_t tokens) {
    return aqlm_decodeq_kernels_for(level, tokens)->name;
}

int aqlm_decodeq_gather_usable(void) {
    const char *setting = getenv("AQLM_DECODEQ_GATHER"); /* "0" turns the gather kernel off */
    if (setting != NULL && strcmp(setting, "0") == 0) return 0;
    return aqlm_decodeq_kernels_avx512vnni.level == AQLM_SIMD_AVX512 && cpu_is_intel_with_vnni();
}

const aqlm_decodeq_kernels *aqlm_decodeq_kernels_for(aqlm_simd level, int64_t tokens) {
    if (level >= AQLM_SIMD_AVX512 && tokens <= AQLM_DECODEQ_GATHER_MAX_TOKENS && aqlm_decodeq_gather_usable())
        return &aqlm_decodeq_kernels_avx512vnni;
    if (level >= AQLM_SIMD_AVX512 && aqlm_decodeq_kernels_avx512.level == AQLM_SIMD_AVX512)
        return &aqlm_decodeq_kernels_avx512;
    if (level >= AQLM_SIMD_AVX2 && aqlm_decodeq_kernels_avx2.level == AQLM_SIMD_AVX2) return &aqlm_decodeq_kernels_avx2;
    return &aqlm_decodeq_kernels_scalar;
}
