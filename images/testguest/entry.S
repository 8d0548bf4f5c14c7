/* Entry points.
 *
 * _start: fabric-vmm starts vCPU 0 here (the ELF entry) already in 64-bit long mode, with
 * interrupts off, page tables identity-mapping the first GiB and RSI = the zero page
 * (struct boot_params).
 *
 * pvh_start: the Xen PVH entry (XEN_ELFNOTE_PHYS32_ENTRY below), which QEMU uses for an ELF
 * -kernel. It is entered in 32-bit protected mode with paging off, flat segments, interrupts
 * off, no stack, and EBX = the physical address of struct hvm_start_info. It builds page
 * tables identity-mapping 4 GiB, enters long mode and joins the 64-bit path; guest_main then
 * reads the command line from start_info instead of the zero page. */

#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define CR0_PG 0x80000000
#define CR4_PAE 0x20
#define PTE_PRESENT_WRITE 0x3
#define PTE_HUGE 0x80
#define XEN_ELFNOTE_PHYS32_ENTRY 18

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    mov %rsi, %rbx                  /* the zero page */
    xor %r12d, %r12d                /* no start_info */

common64:
    mov $__stack_top, %rsp
    /* Clear .bss with plain stores (the stack lives outside it). */
    mov $__bss_start, %rdi
    mov $__bss_end, %rcx
1:  cmp %rcx, %rdi
    jae 2f
    movq $0, (%rdi)
    add $8, %rdi
    jmp 1b

2:  mov %rbx, %rdi
    mov %r12, %rsi
    call guest_main

    /* guest_main resets the machine; if that returns, stop here. */
3:  cli
    hlt
    jmp 3b

    .code32
    .globl pvh_start
pvh_start:
    cli
    mov %ebx, %esi                  /* start_info, kept in ESI */

    /* Page tables in pvh_tables (outside .bss, which is cleared later): PML4[0] -> PDPT,
     * PDPT[0..3] -> PD 0..3, 2048 PD entries of 2 MiB each: 4 GiB identity-mapped. guest_main
     * replaces them with its own (paging_init) before touching the MMIO gap. The loader
     * zero-fills NOLOAD memory, but a loader may not: write every entry used. */
    mov $pvh_pml4, %edi
    mov $pvh_pdpt + PTE_PRESENT_WRITE, %eax
    mov %eax, (%edi)
    movl $0, 4(%edi)

    mov $pvh_pdpt, %edi
    mov $pvh_pd + PTE_PRESENT_WRITE, %eax
    xor %ecx, %ecx
4:  mov %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    add $4096, %eax
    inc %ecx
    cmp $4, %ecx
    jb 4b

    mov $pvh_pd, %edi
    xor %ecx, %ecx                  /* entry number: address = ecx << 21 */
5:  mov %ecx, %eax
    shl $21, %eax
    or $(PTE_PRESENT_WRITE | PTE_HUGE), %eax
    mov %eax, (%edi,%ecx,8)
    mov %ecx, %eax
    shr $11, %eax                   /* bits 32+ of the address: the GiB above 4 GiB, 0 */
    mov %eax, 4(%edi,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 5b

    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $CR0_PG, %eax
    mov %eax, %cr0

    lgdt pvh_gdt_desc
    ljmp $0x08, $pvh_long_mode

    .code64
pvh_long_mode:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    xor %ebx, %ebx                  /* no zero page */
    mov %esi, %r12d                 /* start_info */
    jmp common64

    .section .rodata
    .balign 8
pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff        /* 0x10: flat data */
pvh_gdt_end:
pvh_gdt_desc:
    .word pvh_gdt_end - pvh_gdt - 1
    .long pvh_gdt

    /* The PVH note: name "Xen", type 18, the 32-bit entry address (as a quad, as Linux
     * writes it in 64-bit kernels; readers take 4 or 8 bytes). Notes are 4-byte aligned. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz */
    .long 8                         /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .balign 4
    .quad pvh_start
    .balign 4

    .section .pvh_tables, "aw", @nobits
    .balign 4096
pvh_pml4: .skip 4096
pvh_pdpt: .skip 4096
pvh_pd: .skip 4 * 4096
