/* Exception and interrupt entry points of the IDT that trap.c fills.
 *
 * Exceptions (vectors 0-31) go through one stub each, which pushes a zero where the CPU pushes
 * no error code and then the vector, so that trap_handler gets the same frame for all of them:
 * struct trap_frame { vector, error, rip, cs, rflags, rsp, ss }. Interrupts (32-255) only need
 * to be acknowledged: the local APIC timer's only job is to end a hlt (trap.c). */

#define LAPIC_EOI 0xfee000b0

    .text

    .macro EXCEPTION vector, has_error
trap_exception_\vector:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vector
    jmp trap_common
    .endm

EXCEPTION 0, 0
EXCEPTION 1, 0
EXCEPTION 2, 0
EXCEPTION 3, 0
EXCEPTION 4, 0
EXCEPTION 5, 0
EXCEPTION 6, 0
EXCEPTION 7, 0
EXCEPTION 8, 1
EXCEPTION 9, 0
EXCEPTION 10, 1
EXCEPTION 11, 1
EXCEPTION 12, 1
EXCEPTION 13, 1
EXCEPTION 14, 1
EXCEPTION 15, 0
EXCEPTION 16, 0
EXCEPTION 17, 1
EXCEPTION 18, 0
EXCEPTION 19, 0
EXCEPTION 20, 0
EXCEPTION 21, 1
EXCEPTION 22, 0
EXCEPTION 23, 0
EXCEPTION 24, 0
EXCEPTION 25, 0
EXCEPTION 26, 0
EXCEPTION 27, 0
EXCEPTION 28, 0
EXCEPTION 29, 1
EXCEPTION 30, 1
EXCEPTION 31, 0

/* The frame is 16-byte aligned here whether the trap came from ring 3 (the stack is the TSS's
 * RSP0, aligned) or ring 0 (the CPU aligns it in 64-bit mode): 7 quadwords of frame plus 9
 * saved registers keep the call aligned. */
trap_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    lea 72(%rsp), %rdi
    call trap_handler
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp                   /* vector and error code */
    iretq

    .globl trap_interrupt
trap_interrupt:
    push %rax
    mov $LAPIC_EOI, %rax
    movl $0, (%rax)
    pop %rax
    iretq

    .section .rodata
    .balign 8
    .globl trap_exception_stubs
trap_exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad trap_exception_\v
    .endr
