/* The test guest's whole runtime: fixed-width types, port and MMIO access, memory helpers,
 * the serial console and a small printf. There is no libc and no interrupt handling. */
#ifndef TESTGUEST_LIB_H
#define TESTGUEST_LIB_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGNED(n) __attribute__((aligned(n)))
#define PAGE_SIZE 4096

/* Compiler barrier. x86 keeps stores ordered with stores and loads with loads, and MMIO is
 * uncached, so ordering ring updates against the device only needs the compiler's help. */
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline uint32_t mmio_read32(uint64_t addr) { return *(volatile uint32_t *)addr; }
static inline void mmio_write32(uint64_t addr, uint32_t value) { *(volatile uint32_t *)addr = value; }
static inline uint8_t mmio_read8(uint64_t addr) { return *(volatile uint8_t *)addr; }

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* Parses a number in C notation (0x.. hex or decimal) at *s, advancing *s; 0 if none. */
uint64_t parse_u64(const char **s);

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Everything printed goes to COM1. */
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Maps the first 4 GiB (RAM below the MMIO gap and the virtio-mmio windows in it). */
void paging_init(void);

/* Runs the rest of the program in ring 3 with IOPL 3 (port I/O and MMIO still work; there is no
 * way back). Where KVM is software-nested (kvm-pvm, shared/KVM-HOST.md), kernel-mode guest code
 * goes through KVM's instruction emulator, thousands of times slower than user-mode code, which
 * runs natively: the throughput scenarios run their loops up here. */
void enter_user_mode(void);

/* kvmclock (clock.c). clock_init runs in ring 0 (it writes MSRs); NULL or why there is no
 * clock. The readers work in either ring and return 0 without a clock. */
const char *clock_init(void);
uint64_t clock_ns(void);      /* since the VM's clock started */
uint64_t clock_unix_ms(void); /* the host's real time */
uint64_t clock_tsc_khz(void);

/* Traps and sleeping (trap.c). trap_init runs in ring 0, after clock_init: an IDT (an
 * unexpected exception is printed, then the machine exits) and the local APIC timer. Then
 * idle_until halts the vCPU until the TSC passes the deadline, in ring 0 or ring 3 (where it
 * spins instead without trap_init or a clock). */
void trap_init(void);
void idle_until(uint64_t deadline_tsc);

/* Tells the VMM the guest is done (boot-complete port), then resets through the i8042; where
 * there is none, exits through isa-debug-exit or a triple fault. */
void __attribute__((noreturn)) machine_exit(void);

#endif
