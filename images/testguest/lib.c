/* Runtime support: memory and string helpers, serial output, printf, paging, reset. */
#include "lib.h"

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THR_EMPTY 0x20
#define BOOT_COMPLETE_PORT 0x3f0
#define BOOT_COMPLETE_VALUE 123
#define I8042_COMMAND 0x64
#define I8042_RESET 0xfe
/* QEMU's isa-debug-exit (-device isa-debug-exit,iobase=0xf4,iosize=4): a write ends QEMU. */
#define ISA_DEBUG_EXIT_PORT 0xf4

void *memset(void *dst, int c, size_t n)
{
    volatile uint8_t *d = dst; /* volatile: keep gcc from turning this loop into memset() */
    while (n--)
        *d++ = (uint8_t)c;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    volatile uint8_t *d = dst;
    const uint8_t *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const uint8_t *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (uint8_t)*a < (uint8_t)*b ? -1 : 1;
        if (!*a)
            return 0;
    }
    return 0;
}

uint64_t parse_u64(const char **s)
{
    const char *p = *s;
    uint64_t v = 0;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        for (p += 2;; p++) {
            unsigned d;
            if (*p >= '0' && *p <= '9')
                d = *p - '0';
            else if (*p >= 'a' && *p <= 'f')
                d = *p - 'a' + 10;
            else if (*p >= 'A' && *p <= 'F')
                d = *p - 'A' + 10;
            else
                break;
            v = v * 16 + d;
        }
    } else {
        for (; *p >= '0' && *p <= '9'; p++)
            v = v * 10 + (*p - '0');
    }
    *s = p;
    return v;
}

/* --- printf ------------------------------------------------------------------------------ */

struct out {
    char *buf;
    size_t size, len;
};

static void put(struct out *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void put_number(struct out *o, uint64_t v, unsigned base, int negative, int width, char pad)
{
    char digits[24];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (negative)
        digits[n++] = '-';
    for (; width > n; width--)
        put(o, pad);
    while (n)
        put(o, digits[--n]);
}

/* Supports %[0][width][l|ll](d|u|x|s|c|p) and %%: all the test guest needs. */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct out o = {buf, size, 0};
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        char pad = ' ';
        int width = 0, longs = 0;
        fmt++;
        if (*fmt == '0')
            pad = '0', fmt++;
        for (; *fmt >= '0' && *fmt <= '9'; fmt++)
            width = width * 10 + (*fmt - '0');
        for (; *fmt == 'l'; fmt++)
            longs++;
        switch (*fmt) {
        case 'd': {
            int64_t v = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
            put_number(&o, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0, width, pad);
            break;
        }
        case 'u':
            put_number(&o, longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, 0, width, pad);
            break;
        case 'x':
            put_number(&o, longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, 0, width, pad);
            break;
        case 'p':
            put(&o, '0');
            put(&o, 'x');
            put_number(&o, (uint64_t)va_arg(ap, void *), 16, 0, width, pad);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            for (s = s ? s : "(null)"; *s; s++)
                put(&o, *s);
            break;
        }
        case 'c':
            put(&o, (char)va_arg(ap, int));
            break;
        case '%':
            put(&o, '%');
            break;
        default: /* unknown conversion: show it rather than guess */
            put(&o, '%');
            if (!*fmt)
                goto done;
            put(&o, *fmt);
        }
    }
done:
    if (size)
        buf[o.len < size ? o.len : size - 1] = '\0';
    return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

static void serial_putc(char c)
{
    /* Bounded wait: a missing UART must not hang the guest. */
    for (int i = 0; i < 100000 && !(inb(COM1_LSR) & LSR_THR_EMPTY); i++)
        ;
    outb(COM1, (uint8_t)c);
}

void printf(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    for (const char *p = line; *p; p++) {
        if (*p == '\n')
            serial_putc('\r');
        serial_putc(*p);
    }
}

/* --- paging and reset -------------------------------------------------------------------- */

#define PTE_PRESENT 0x1
#define PTE_WRITE 0x2
#define PTE_USER 0x4
#define PTE_PWT 0x8
#define PTE_PCD 0x10
#define PTE_HUGE 0x80
#define GIB (1ull << 30)

static uint64_t pml4[512] ALIGNED(PAGE_SIZE);
static uint64_t pdpt[512] ALIGNED(PAGE_SIZE);
static uint64_t pd[4][512] ALIGNED(PAGE_SIZE);

/* The VMM's boot page tables map only the first GiB; virtio-mmio windows sit at 0xd0000000.
 * Identity-map 4 GiB with 2 MiB pages; the top GiB (the MMIO gap) uncached. */
void paging_init(void)
{
    for (uint64_t g = 0; g < 4; g++) {
        uint64_t cache = g == 3 ? PTE_PCD | PTE_PWT : 0;
        for (uint64_t i = 0; i < 512; i++)
            pd[g][i] = (g * GIB + (i << 21)) | PTE_PRESENT | PTE_WRITE | PTE_HUGE | cache;
        pdpt[g] = (uint64_t)pd[g] | PTE_PRESENT | PTE_WRITE;
    }
    pml4[0] = (uint64_t)pdpt | PTE_PRESENT | PTE_WRITE;
    __asm__ volatile("mov %0, %%cr3" : : "r"((uint64_t)pml4) : "memory");
}

/* --- user mode ------------------------------------------------------------------------- */

#define CR4_SMEP (1ull << 20)
#define CR4_SMAP (1ull << 21)
#define RFLAGS_IOPL3 0x3000
#define RFLAGS_RESERVED 0x2

/* null, kernel code (0x08), kernel data (0x10), user data (0x18), user code (0x20), and the
 * TSS (0x28, two entries), whose RSP0 is the stack traps from ring 3 run on (trap.c). */
static uint64_t user_gdt[7] ALIGNED(16) = {
    0, 0x00af9a000000ffffull, 0x00cf92000000ffffull, 0x00cff2000000ffffull, 0x00affa000000ffffull, 0, 0,
};
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)
#define TSS_SELECTOR 0x28
#define TSS_AVAILABLE_64 0x89 /* present, DPL 0, available 64-bit TSS */

/* With a TSS loaded, ring-3 port I/O is checked against its I/O permission bitmap where KVM
 * emulates it (kvm-pvm does, whatever IOPL says): the bitmap allows every port (all zeros,
 * then the 0xff byte that ends it). */
static struct {
    uint32_t reserved0;
    uint64_t rsp0, rsp1, rsp2, reserved1, ist[7], reserved2;
    uint16_t reserved3, iomap_base;
    uint8_t iomap[65536 / 8];
    uint8_t iomap_end;
} __attribute__((packed)) tss ALIGNED(16);
static uint8_t trap_stack[8192] ALIGNED(16);

void enter_user_mode(void)
{
    static struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) gdtr;
    gdtr.limit = sizeof(user_gdt) - 1;
    gdtr.base = (uint64_t)user_gdt;
    tss.rsp0 = (uint64_t)(trap_stack + sizeof(trap_stack));
    tss.iomap_base = (uint16_t)((uint64_t)tss.iomap - (uint64_t)&tss);
    tss.iomap_end = 0xff;
    uint64_t base = (uint64_t)&tss, limit = sizeof(tss) - 1;
    user_gdt[5] = (limit & 0xffff) | (base & 0xffffff) << 16 | (uint64_t)TSS_AVAILABLE_64 << 40 |
                  ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
    user_gdt[6] = base >> 32;
    /* Every page user-accessible, and the kernel allowed to touch them (no SMEP/SMAP). */
    uint64_t cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4 & ~(CR4_SMEP | CR4_SMAP)));
    for (unsigned g = 0; g < 4; g++) {
        for (unsigned i = 0; i < 512; i++)
            pd[g][i] |= PTE_USER;
        pdpt[g] |= PTE_USER;
    }
    pml4[0] |= PTE_USER;
    __asm__ volatile("mov %0, %%cr3" : : "r"((uint64_t)pml4) : "memory");
    /* An iretq to the next instruction, same stack, CPL 3, IOPL 3 (port I/O stays allowed),
     * interrupts off. */
    __asm__ volatile("lgdt %0\n\t"
                     "ltr %w1\n\t"
                     "mov %%rsp, %%rax\n\t"
                     "pushq %2\n\t"
                     "pushq %%rax\n\t"
                     "pushq %3\n\t"
                     "pushq %4\n\t"
                     "lea 1f(%%rip), %%rax\n\t"
                     "pushq %%rax\n\t"
                     "iretq\n"
                     "1:"
                     :
                     : "m"(gdtr), "r"((uint16_t)TSS_SELECTOR), "i"(USER_DS), "i"(RFLAGS_IOPL3 | RFLAGS_RESERVED),
                       "i"(USER_CS)
                     : "rax", "memory");
}

void machine_exit(void)
{
    outb(BOOT_COMPLETE_PORT, BOOT_COMPLETE_VALUE);
    outb(I8042_COMMAND, I8042_RESET);
    /* Machines without an i8042 (QEMU microvm) carry on here: isa-debug-exit if QEMU has one,
     * else a triple fault (an exception with an empty IDT), which -no-reboot turns into an exit. */
    outb(ISA_DEBUG_EXIT_PORT, 0);
    static const struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) no_idt = {0, 0};
    __asm__ volatile("lidt %0; ud2" : : "m"(no_idt));
    for (;;)
        __asm__ volatile("cli; hlt");
}
