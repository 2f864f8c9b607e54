#!/bin/sh
# Build kport's eBPF object (kport/sources/proc_bpf.bpf.o) from its C source beside it:
# vmlinux.h is generated from the running kernel's BTF, the object is CO-RE, so it runs on
# any kernel with BTF. Needs Debian's clang, llvm, bpftool and libbpf-dev.
#
#   sh scripts/build-bpf.sh [--optional] [OUT]
#
# --optional (make): where this kernel has no BTF, say so and build nothing; kport's proc
# source then uses the proc connector (proc.backend = auto). Without it (a pip build),
# that is an error: the package would have no eBPF backend.
set -eu
cd "$(dirname "$0")/.."
optional=false
if [ "${1:-}" = "--optional" ]; then
    optional=true
    shift
fi
src=kport/sources/proc_bpf.bpf.c
out=${1:-kport/sources/proc_bpf.bpf.o}
btf=/sys/kernel/btf/vmlinux
fail() {
    echo "kport: cannot build $out: $*" >&2
    exit 1
}
if [ ! -r "$btf" ]; then
    if $optional; then
        echo "kport: this kernel has no BTF ($btf): no eBPF backend; the proc source will use the proc connector" >&2
        exit 0
    fi
    fail "this kernel has no BTF ($btf) to build against"
fi
for cmd in clang llvm-strip bpftool; do
    command -v "$cmd" >/dev/null 2>&1 || fail "$cmd is missing (Debian: apt-get install clang llvm bpftool libbpf-dev)"
done
[ -f /usr/include/bpf/bpf_helpers.h ] || fail "libbpf's headers are missing (Debian: apt-get install libbpf-dev)"
case "$(uname -m)" in
    x86_64) arch=x86 ;;
    aarch64) arch=arm64 ;;
    s390x) arch=s390 ;;
    ppc64le) arch=powerpc ;;
    riscv64) arch=riscv ;;
    *) fail "no BPF target architecture known for $(uname -m)" ;;
esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bpftool btf dump file "$btf" format c > "$tmp/vmlinux.h"
# -g: the BTF that CO-RE relocates by; the DWARF beside it is stripped
clang -g -O2 -Wall -target bpf "-D__TARGET_ARCH_$arch" -I"$tmp" -c "$src" -o "$tmp/obj.o"
llvm-strip -g "$tmp/obj.o"
mv "$tmp/obj.o" "$out"
echo "kport: built $out"
