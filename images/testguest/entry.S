/* Entry point. fabric-vmm starts vCPU 0 here already in 64-bit long mode, with interrupts off,
 * page tables identity-mapping the first GiB and RSI = the zero page (struct boot_params). */

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    mov $__stack_top, %rsp
    mov %rsi, %rbx                  /* keep the zero page across the .bss clear */

    /* Clear .bss with plain stores (the stack lives outside it). */
    mov $__bss_start, %rdi
    mov $__bss_end, %rcx
1:  cmp %rcx, %rdi
    jae 2f
    movq $0, (%rdi)
    add $8, %rdi
    jmp 1b

2:  mov %rbx, %rdi
    call guest_main

    /* guest_main resets the machine; if that returns, stop here. */
3:  cli
    hlt
    jmp 3b
