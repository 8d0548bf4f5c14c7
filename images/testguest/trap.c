/* Traps, and sleeping without burning the host's CPU.
 *
 * The test guest runs its loops in ring 3 (enter_user_mode), where it cannot halt: hlt is
 * privileged. A scenario that waits for the host for minutes (memload) would otherwise spin
 * a host core for its whole life. So trap_init installs an IDT whose #GP handler treats a
 * `hlt` executed in ring 3 as "sleep until idle_deadline_tsc": it arms the local APIC timer
 * (one-shot) and halts in ring 0 with interrupts on until the deadline, then resumes the user
 * code after the hlt. Ring-0 code is emulated where KVM is software-nested, so each sleep
 * costs a few hundred microseconds of host CPU; sleeping a few milliseconds at a time keeps
 * an idle guest at a few percent of a core.
 *
 * Any other exception prints the vector and where it happened and ends the machine: without
 * an IDT the guest would triple-fault and reset without a word. */
#include "lib.h"

#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1

#define LAPIC_BASE 0xfee00000ull
#define LAPIC_TPR 0x080
#define LAPIC_SVR 0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_LVT_MASKED (1u << 16)
#define LAPIC_DIVIDE_BY_1 0xb
#define SPURIOUS_VECTOR 0xff
#define TIMER_VECTOR 0x40
/* KVM's local APIC timer counts at 1 GHz (its APIC bus cycle is 1 ns) with divide-by-1. If
 * it does not, the sleep loop below still ends at the deadline: it re-arms until the TSC is
 * past it. */
#define LAPIC_TICKS_PER_US 1000ull
#define MAX_TIMER_COUNT 0xffffffffull

#define VECTOR_GP 13
#define OPCODE_HLT 0xf4
#define KERNEL_CS 0x08
#define IDT_INTERRUPT_GATE 0x8e /* present, DPL 0, 64-bit interrupt gate (IF cleared on entry) */

struct trap_frame {
    uint64_t vector, error, rip, cs, rflags, rsp, ss;
};

struct idt_entry {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;
    uint8_t type;
    uint16_t offset_mid;
    uint32_t offset_high;
    uint32_t reserved;
} __attribute__((packed));

extern const uint64_t trap_exception_stubs[32];
extern char trap_interrupt[];

static struct idt_entry idt[256] ALIGNED(16);
static int trap_ready;
volatile uint64_t idle_deadline_tsc;

static void lapic_write(unsigned reg, uint32_t value) { mmio_write32(LAPIC_BASE + reg, value); }

static void set_gate(unsigned vector, uint64_t handler)
{
    idt[vector] = (struct idt_entry){
        .offset_low = (uint16_t)handler,
        .selector = KERNEL_CS,
        .type = IDT_INTERRUPT_GATE,
        .offset_mid = (uint16_t)(handler >> 16),
        .offset_high = (uint32_t)(handler >> 32),
    };
}

void trap_init(void)
{
    for (unsigned v = 0; v < 32; v++)
        set_gate(v, trap_exception_stubs[v]);
    for (unsigned v = 32; v < 256; v++)
        set_gate(v, (uint64_t)trap_interrupt);
    static struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr;
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (uint64_t)idt;
    __asm__ volatile("lidt %0" : : "m"(idtr));
    /* No device interrupts: the legacy PICs masked, the local APIC's external lines too. */
    outb(PIC1_DATA, 0xff);
    outb(PIC2_DATA, 0xff);
    lapic_write(LAPIC_SVR, LAPIC_SVR_ENABLE | SPURIOUS_VECTOR);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_LVT_LINT1, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_LVT_ERROR, LAPIC_LVT_MASKED);
    lapic_write(LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_BY_1);
    lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR); /* one-shot */
    trap_ready = 1;
}

/* In ring 0: halts with interrupts on until the TSC passes the deadline. */
static void sleep_until(uint64_t deadline, uint64_t tsc_khz)
{
    for (uint64_t now = rdtsc(); now < deadline; now = rdtsc()) {
        uint64_t us = (deadline - now) * 1000 / (tsc_khz ? tsc_khz : 1);
        uint64_t count = (us + 1) * LAPIC_TICKS_PER_US;
        lapic_write(LAPIC_TIMER_INITIAL, (uint32_t)(count < MAX_TIMER_COUNT ? count : MAX_TIMER_COUNT));
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    }
    lapic_write(LAPIC_TIMER_INITIAL, 0);
}

void trap_handler(struct trap_frame *f)
{
    if (f->vector == VECTOR_GP && (f->cs & 3) == 3 && *(volatile uint8_t *)f->rip == OPCODE_HLT) {
        sleep_until(idle_deadline_tsc, clock_tsc_khz());
        f->rip += 1;
        return;
    }
    uint64_t cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    printf("testguest: unexpected exception %lu (error 0x%lx) at rip 0x%lx cs 0x%lx rsp 0x%lx cr2 0x%lx\n",
           f->vector, f->error, f->rip, f->cs, f->rsp, cr2);
    machine_exit();
}

static int in_user_mode(void)
{
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return (cs & 3) == 3;
}

void idle_until(uint64_t deadline_tsc)
{
    if (!trap_ready || !clock_tsc_khz()) {
        while (rdtsc() < deadline_tsc)
            __asm__ volatile("pause");
        return;
    }
    if (!in_user_mode()) {
        sleep_until(deadline_tsc, clock_tsc_khz());
        return;
    }
    idle_deadline_tsc = deadline_tsc;
    /* Traps to trap_handler (#GP: hlt in ring 3), which sleeps and resumes after it. */
    __asm__ volatile("hlt" ::: "memory");
}
