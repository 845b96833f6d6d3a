/* The vmsplice blob of criu_py/dump/parasite.py (VMSPLICE_BLOB there, whose comment
 * says what it does and where its parameters are; r12 = the parameter area). It runs
 * inside a frozen task, never touches rsp and falls through its end into the blob
 * ending parasite.py appends (SIGNAL_END + BLOB_END). Not compiled into the package:
 * after a change, rebuild the bytes with
 *   gcc -c vmsplice.S -o /tmp/v.o && objcopy -O binary -j .text /tmp/v.o /tmp/v.bin && xxd -p /tmp/v.bin
 * and paste them into VMSPLICE_BLOB. */
	.set CHUNK, 1048576
	.text
blob:					# rbx: this iovec, r13: iovecs left
	lea 96(%r12), %rbx
	mov 8(%r12), %r13
next_iov:
	test %r13, %r13
	jz ok
chunk:					# r10 = the chunk: at most CHUNK of what is left
	mov 8(%rbx), %r10
	test %r10, %r10
	jz adv_iov
	mov $CHUNK, %r11
	cmp %r11, %r10
	cmova %r11, %r10
	mov (%rbx), %rsi
	mov %rsi, 64(%r12)		# the chunk's iovec, for vmsplice
	mov %r10, 72(%r12)
	mov %r10, 80(%r12)		# and its length, kept
	mov 56(%r12), %rdi		# rdi: where the CRCs go, r8: blocks
	mov %r10, %r8
	shr $12, %r8
three:					# CRC-32C of three blocks at once
	cmp $3, %r8
	jb one
	mov $0xffffffff, %eax
	mov $0xffffffff, %edx
	mov $0xffffffff, %ecx
	xor %r9d, %r9d
1:	crc32q (%rsi,%r9), %rax
	crc32q 4096(%rsi,%r9), %rdx
	crc32q 8192(%rsi,%r9), %rcx
	add $8, %r9
	cmp $4096, %r9
	jne 1b
	not %eax
	not %edx
	not %ecx
	mov %eax, (%rdi)
	mov %edx, 4(%rdi)
	mov %ecx, 8(%rdi)
	add $12, %rdi
	add $12288, %rsi
	sub $3, %r8
	jmp three
one:					# then one at a time
	test %r8, %r8
	jz crcs_done
	mov $0xffffffff, %eax
	xor %r9d, %r9d
2:	crc32q (%rsi,%r9), %rax
	add $8, %r9
	cmp $4096, %r9
	jne 2b
	not %eax
	mov %eax, (%rdi)
	add $4, %rdi
	add $4096, %rsi
	dec %r8
	jmp one
crcs_done:
	mov %rdi, 56(%r12)
splice:					# vmsplice(fd, &chunk, 1, 0) until it is all in the pipe
	cmpq $0, 72(%r12)
	je chunk_done
	mov $278, %eax
	mov (%r12), %rdi
	lea 64(%r12), %rsi
	mov $1, %edx
	xor %r10d, %r10d
	syscall
	cmp $-4, %rax
	je splice
	test %rax, %rax
	jle fail
	add %rax, 64(%r12)
	sub %rax, 72(%r12)
	add %rax, 24(%r12)
	jmp splice
chunk_done:				# the iovec moves past the chunk
	mov 80(%r12), %rax
	add %rax, (%rbx)
	sub %rax, 8(%rbx)
	jmp chunk
adv_iov:
	add $16, %rbx
	dec %r13
	jmp next_iov
ok:
	xor %eax, %eax
	mov %rax, 16(%r12)
	jmp end
fail:					# r <= 0: the error (0: -EIO) out; after -EPIPE, take back the SIGPIPE
	jnz 5f
	mov $-5, %rax
5:	mov %rax, 16(%r12)
	cmp $-32, %rax
	jne end
	mov $128, %eax
	lea 32(%r12), %rdi
	xor %esi, %esi
	lea 40(%r12), %rdx
	mov $8, %r10d
	syscall
end:
