/*
 * Two-stage BIOS boot program for an NBD end-to-end test (1.44M floppy, drive 0, CHS int 13h).
 * GNU as (binutils) syntax, no other toolchain needed:
 *   as --32 -o fdboot.o fdboot.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o fdboot.bin fdboot.o   (run here: it includes serial.inc)
 *
 * The image is a FAT12 floppy (mkfs.fat -F 12 -R 4): the test keeps its BPB (bytes 3..61 of sector
 * 0) and puts this program's bytes 0..2 and 62..511 around it, and stage 2 into the reserved
 * sectors 1..3. Nothing here depends on the BPB's values.
 *
 * Sector 0   stage 1: loads stage 2 (C0 H0 S2..S4) with AH=02h, jumps to it.
 * Sectors 1..3 stage 2: AH=08h (geometry), reads C40 H1 S1 and the last sector (C79 H1 S18) and
 *            prints the NUL-terminated text found there, reads a whole track (C1 H0 S1..18) and prints
 *            the 32-bit hash h=h*31+byte, writes C79 H1 S17 with AH=03h, reads it back and compares,
 *            then exits QEMU through isa-debug-exit (port 0xf4).
 * Exit status seen by the host: (value << 1) | 1  ->  0x10 gives 33 (pass), 0x01 gives 3 (fail).
 * All output goes to COM1 (0x3f8), one line per step.
 */
        .code16
        .intel_syntax noprefix
        .text
        .globl _start

        .set STAGE2_SECTORS, 3
        .set RDBUF, 0x9000
        .set WRBUF, 0xa000
        .set SUMSEG, 0x1000         /* 0x10000 .. 0x123ff: inside one 64 KiB DMA page */
        .set TRACK, 18

_start:
        .byte 0xeb, start1 - _start - 2   /* jmp short start1: eb 3c 90, as a FAT boot sector starts */
        nop
        .org 0x3e                   /* the BPB (bytes 3..61) comes from mkfs.fat */
start1:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        sti
        cld
        .byte 0xea                  /* jmp far 0000:1f (normalise CS) */
        .word 1f, 0
1:      mov [drive], dl
        mov si, offset m_s1
        call puts
        mov al, [drive]
        call hex8
        call crlf
        /* load stage 2: C0 H0 S2, STAGE2_SECTORS sectors to 0:7e00 */
        mov bx, 0x7e00
        mov ax, 0x0200 + STAGE2_SECTORS
        mov cx, 0x0002
        xor dh, dh
        call chs_io
        jmp stage2

/* int 13h CHS call with AX/BX/CX/DH preset (ES = segment); up to 3 tries with a reset between */
chs_io:
        mov byte ptr [tries], 3
2:      push ax
        mov dl, [drive]
        int 0x13
        jnc 3f
        mov [err], ah
        xor ax, ax                  /* AH=00h: reset the controller */
        mov dl, [drive]
        int 0x13
        pop ax
        dec byte ptr [tries]
        jnz 2b
io_error:                           /* print "INT13 ERROR ah=<err>" and fail */
        mov si, offset m_ioerr
        call puts
        mov al, [err]
        call hex8
        call crlf
        mov si, offset m_empty
        jmp fail
3:      pop ax
        ret

fail:
        call puts
        mov si, offset m_fail
        call puts
        mov al, 0x01
        jmp qexit
pass:
        mov si, offset m_pass
        call puts
        mov al, 0x10
qexit:
        out 0xf4, al                /* isa-debug-exit: QEMU exits now */
4:      cli
        hlt
        jmp 4b

        .include "serial.inc"

m_s1:   .asciz "FDBOOT STAGE1 OK drive="
m_ioerr:.asciz "INT13 ERROR ah="
m_fail: .asciz " FAIL\r\n"
m_pass: .asciz "ALL-OK\r\n"
m_empty:.byte 0
drive:  .byte 0
tries:  .byte 0
err:    .byte 0

        .org 510
        .byte 0x55, 0xaa

/* ---------------- stage 2 (sectors 1..3) ---------------- */
stage2:
        mov si, offset m_s2
        call puts
        /* AH=08h: CH = last cylinder, CL = last sector (+ cylinder bits 8-9), DH = last head, BL = type */
        mov ah, 0x08
        mov dl, [drive]
        push es
        int 0x13
        pop es
        jc io_fail
        mov [geo_c], ch
        mov [geo_s], cl
        mov [geo_h], dh
        mov [geo_t], bl
        mov si, offset m_geo
        call puts
        mov al, [geo_c]
        call hex8
        mov si, offset m_geo_h
        call puts
        mov al, [geo_h]
        call hex8
        mov si, offset m_geo_s
        call puts
        mov al, [geo_s]
        and al, 0x3f
        call hex8
        mov si, offset m_geo_t
        call puts
        mov al, [geo_t]
        call hex8
        call crlf

        /* C40 H1 S1 and the last sector C79 H1 S18: print their text */
        mov cx, (40 << 8) | 1
        mov dh, 1
        mov si, offset m_mid
        call read_print
        mov cx, (79 << 8) | 18
        mov dh, 1
        mov si, offset m_end
        call read_print

        /* a whole track, C1 H0 S1..18, into SUMSEG:0; 32-bit hash h = h*31 + byte */
        push es
        mov ax, SUMSEG
        mov es, ax
        xor bx, bx
        mov ax, 0x0200 + TRACK
        mov cx, (1 << 8) | 1
        xor dh, dh
        call chs_io
        pop es
        push ds
        mov ax, SUMSEG
        mov ds, ax
        xor si, si
        xor ebx, ebx
        xor eax, eax
        mov cx, TRACK * 512
8:      lodsb
        imul ebx, ebx, 31
        add ebx, eax
        loop 8b
        pop ds
        mov si, offset m_sum
        call puts
        mov eax, ebx
        call hex32
        call crlf

        /* write C79 H1 S17: "GUEST-WROTE-THIS-SECTOR" + 0xA5 fill, then read back and compare */
        mov di, WRBUF
        mov cx, 512
        mov al, 0xa5
        rep stosb
        mov si, offset m_wtext
        mov di, WRBUF
9:      lodsb
        stosb
        test al, al
        jnz 9b
        mov bx, WRBUF
        mov ax, 0x0301
        mov cx, (79 << 8) | 17
        mov dh, 1
        call chs_io
        mov si, offset m_wrote
        call puts
        mov di, RDBUF
        mov cx, 512
        xor al, al
        rep stosb
        mov bx, RDBUF
        mov ax, 0x0201
        mov cx, (79 << 8) | 17
        mov dh, 1
        call chs_io
        mov si, WRBUF
        mov di, RDBUF
        mov cx, 512
        repe cmpsb
        jne 10f
        mov si, offset m_rbok
        call puts
        jmp pass
10:     mov si, offset m_rbbad
        jmp fail

io_fail:
        mov [err], ah
        jmp io_error

hex16:  push ax
        mov al, ah
        call hex8
        pop ax
        jmp hex8
hex32:  push eax
        shr eax, 16
        call hex16
        pop eax
        jmp hex16

/* CX = cylinder << 8 | sector, DH = head, SI = label: read 1 sector, print "label: <text>" */
read_print:
        push cx
        push dx
        call puts
        mov al, ':'
        call putc
        mov al, ' '
        call putc
        mov di, RDBUF               /* clear the buffer so stale data cannot pass */
        mov cx, 512
        xor al, al
        rep stosb
        pop dx
        pop cx
        mov bx, RDBUF
        mov ax, 0x0201
        call chs_io
        mov si, RDBUF
        mov byte ptr [RDBUF+80], 0  /* print at most 80 chars */
        call puts
        jmp crlf

m_s2:   .asciz "FDBOOT STAGE2 OK (C0 H0 S2 via AH=02h)\r\n"
m_geo:  .asciz "GEOMETRY LASTC="
m_geo_h:.asciz " LASTH="
m_geo_s:.asciz " SPT="
m_geo_t:.asciz " TYPE="
m_mid:  .asciz "C40 H1 S1"
m_end:  .asciz "C79 H1 S18"
m_sum:  .asciz "HASH31 C1 H0 S1-18: "
m_wtext:.asciz "GUEST-WROTE-THIS-SECTOR"
m_wrote:.asciz "WROTE C79 H1 S17\r\n"
m_rbok: .asciz "READBACK OK\r\n"
m_rbbad:.asciz "READBACK MISMATCH"
geo_c:  .byte 0
geo_h:  .byte 0
geo_s:  .byte 0
geo_t:  .byte 0
        .org 512 * (1 + STAGE2_SECTORS)
