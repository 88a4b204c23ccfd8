// Attaches a cgroup_skb program to cgroup DIR that drops IPv4 packets whose destination
// (egress) or source (ingress) is ADDR: the kind of check systemd's IPAddressDeny= compiles to.
// Usage: attach DIR egress|ingress ADDR. The attachment outlives this program (until the
// cgroup is removed). Hand-assembled, so it needs only gcc and kernel headers.
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define I(code, dst, src, off, imm) ((struct bpf_insn){code, dst, src, off, imm})

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s CGROUP_DIR egress|ingress IPV4\n", argv[0]);
    return 2;
  }
  int egress = strcmp(argv[2], "egress") == 0;
  struct in_addr a;
  if (inet_pton(AF_INET, argv[3], &a) != 1) return 2;
  int off = egress ? 16 : 12; // daddr or saddr in the IPv4 header
  struct bpf_insn prog[] = {
      /* 0 */ I(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1, 0, 0),    // r6 = skb
      /* 1 */ I(BPF_LDX | BPF_W | BPF_MEM, 7, 6, 16, 0),      // r7 = skb->protocol
      /* 2 */ I(BPF_JMP | BPF_JNE | BPF_K, 7, 0, 10, 0x0008), // not IPv4: goto 13 (pass)
      /* 3 */ I(BPF_ALU64 | BPF_MOV | BPF_X, 1, 6, 0, 0),    // r1 = skb
      /* 4 */ I(BPF_ALU64 | BPF_MOV | BPF_K, 2, 0, 0, off),  // r2 = offset
      /* 5 */ I(BPF_ALU64 | BPF_MOV | BPF_X, 3, 10, 0, 0),   // r3 = frame pointer
      /* 6 */ I(BPF_ALU64 | BPF_ADD | BPF_K, 3, 0, 0, -4),   // r3 -= 4
      /* 7 */ I(BPF_ALU64 | BPF_MOV | BPF_K, 4, 0, 0, 4),    // r4 = 4 bytes
      /* 8 */ I(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_skb_load_bytes),
      /* 9 */ I(BPF_JMP | BPF_JNE | BPF_K, 0, 0, 3, 0),      // load failed: goto 13 (pass)
      /* 10 */ I(BPF_LDX | BPF_W | BPF_MEM, 1, 10, -4, 0),   // r1 = the address
      /* 11 */ I(BPF_ALU64 | BPF_MOV | BPF_K, 2, 0, 0, (int)a.s_addr),
      /* 12 */ I(BPF_JMP | BPF_JEQ | BPF_X, 1, 2, 2, 0),     // match: goto 15 (drop)
      /* 13 */ I(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, 1),   // pass
      /* 14 */ I(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
      /* 15 */ I(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, 0),   // drop
      /* 16 */ I(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
  };
  static char log[65536];
  union bpf_attr at;
  memset(&at, 0, sizeof at);
  at.prog_type = BPF_PROG_TYPE_CGROUP_SKB;
  at.expected_attach_type = egress ? BPF_CGROUP_INET_EGRESS : BPF_CGROUP_INET_INGRESS;
  at.insns = (unsigned long)prog;
  at.insn_cnt = sizeof prog / sizeof prog[0];
  at.license = (unsigned long)"GPL";
  at.log_buf = (unsigned long)log;
  at.log_size = sizeof log;
  at.log_level = 1;
  int pfd = syscall(__NR_bpf, BPF_PROG_LOAD, &at, sizeof at);
  if (pfd < 0) {
    perror("BPF_PROG_LOAD");
    fputs(log, stderr);
    return 1;
  }
  int cfd = open(argv[1], O_RDONLY | O_DIRECTORY);
  if (cfd < 0) {
    perror(argv[1]);
    return 1;
  }
  memset(&at, 0, sizeof at);
  at.target_fd = cfd;
  at.attach_bpf_fd = pfd;
  at.attach_type = egress ? BPF_CGROUP_INET_EGRESS : BPF_CGROUP_INET_INGRESS;
  at.attach_flags = BPF_F_ALLOW_MULTI;
  if (syscall(__NR_bpf, BPF_PROG_ATTACH, &at, sizeof at) < 0) {
    perror("BPF_PROG_ATTACH");
    return 1;
  }
  return 0;
}
