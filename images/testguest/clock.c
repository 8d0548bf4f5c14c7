/* A clock: KVM's paravirtual clock (kvmclock), which fabric-vmm keeps in the guest's CPUID.
 *
 * The guest registers two structures with KVM (MSRs, ring 0): the per-vCPU time info, from
 * which the TSC converts to nanoseconds since the VM's clock started (and gives the TSC's
 * frequency), and the wall clock, the host's real time at that start. Reading the clock is
 * then memory reads and rdtsc, which work in ring 3: unix time in the guest that the host can
 * put next to its own measurements. */
#include "lib.h"

#define KVM_CPUID_SIGNATURE 0x40000000u
#define KVM_CPUID_FEATURES 0x40000001u
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)
#define MSR_KVM_WALL_CLOCK_NEW 0x4b564d00u
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01u

struct pvclock_vcpu_time_info {
    uint32_t version;
    uint32_t pad0;
    uint64_t tsc_timestamp;
    uint64_t system_time;
    uint32_t tsc_to_system_mul;
    int8_t tsc_shift;
    uint8_t flags;
    uint8_t pad[2];
} __attribute__((packed));

struct pvclock_wall_clock {
    uint32_t version;
    uint32_t sec;
    uint32_t nsec;
} __attribute__((packed));

static volatile struct pvclock_vcpu_time_info time_info ALIGNED(64);
static volatile struct pvclock_wall_clock wall_clock ALIGNED(64);
static int clock_ok;
static uint64_t tsc_khz;
static uint64_t wall_at_zero_ns;

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static void wrmsr(uint32_t msr, uint64_t value)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)));
}

/* One consistent copy of the time info (version even and unchanged across the copy). */
static struct pvclock_vcpu_time_info read_time_info(void)
{
    struct pvclock_vcpu_time_info t;
    uint32_t version;
    do {
        version = time_info.version;
        barrier();
        t.tsc_timestamp = time_info.tsc_timestamp;
        t.system_time = time_info.system_time;
        t.tsc_to_system_mul = time_info.tsc_to_system_mul;
        t.tsc_shift = time_info.tsc_shift;
        barrier();
    } while ((version & 1) || version != time_info.version);
    return t;
}

const char *clock_init(void)
{
    uint32_t a, b, c, d;
    cpuid(KVM_CPUID_SIGNATURE, &a, &b, &c, &d);
    /* "KVMKVMKVM\0\0\0" in EBX, ECX, EDX. */
    if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d || a < KVM_CPUID_FEATURES)
        return "no KVM CPUID leaves";
    cpuid(KVM_CPUID_FEATURES, &a, &b, &c, &d);
    if (!(a & KVM_FEATURE_CLOCKSOURCE2))
        return "KVM does not offer kvmclock (KVM_FEATURE_CLOCKSOURCE2)";
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (uint64_t)&time_info | 1);
    wrmsr(MSR_KVM_WALL_CLOCK_NEW, (uint64_t)&wall_clock);
    /* KVM fills the time info on the next entry: the wrmsr exits, so it is there now. */
    for (int tries = 0; tries < 1000 && !time_info.tsc_to_system_mul; tries++)
        barrier();
    struct pvclock_vcpu_time_info t = read_time_info();
    if (!t.tsc_to_system_mul)
        return "kvmclock time info stays empty";
    /* As Linux's pvclock_tsc_khz. */
    uint64_t khz = (1000000ull << 32) / t.tsc_to_system_mul;
    if (t.tsc_shift < 0)
        khz <<= -t.tsc_shift;
    else
        khz >>= t.tsc_shift;
    tsc_khz = khz;
    uint32_t version;
    uint64_t sec, nsec;
    do {
        version = wall_clock.version;
        barrier();
        sec = wall_clock.sec;
        nsec = wall_clock.nsec;
        barrier();
    } while ((version & 1) || version != wall_clock.version);
    wall_at_zero_ns = sec * 1000000000ull + nsec;
    clock_ok = 1;
    return NULL;
}

uint64_t clock_ns(void)
{
    if (!clock_ok)
        return 0;
    struct pvclock_vcpu_time_info t = read_time_info();
    uint64_t now = rdtsc();
    uint64_t delta = now > t.tsc_timestamp ? now - t.tsc_timestamp : 0;
    if (t.tsc_shift < 0)
        delta >>= -t.tsc_shift;
    else
        delta <<= t.tsc_shift;
    return t.system_time + (uint64_t)(((unsigned __int128)delta * t.tsc_to_system_mul) >> 32);
}

uint64_t clock_unix_ms(void) { return clock_ok ? (wall_at_zero_ns + clock_ns()) / 1000000 : 0; }

uint64_t clock_tsc_khz(void) { return tsc_khz; }
