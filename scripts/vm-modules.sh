# Sourced by scripts/rxe-vm.sh and scripts/boot-vm.sh (not run on its own).
#
# collect_modules STAGE KROOT KVER MODULE...: copies each MODULE of the
# kernel unpacked at KROOT (version KVER) into STAGE/modules, after the
# modules it depends on, and lists them in load order in
# STAGE/modules/order (an initramfs insmods them in that order). Modules
# built into the kernel are skipped.
collect_modules() {
  local stage=$1 kroot=$2 kver=$3 m ko name
  shift 3
  mkdir -p "$stage/modules"
  : >"$stage/modules/order"
  for m in "$@"; do
    modprobe -d "$kroot" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }' |
      while read -r ko; do
        name=$(basename "$ko")
        grep -qx "$name" "$stage/modules/order" && continue
        cp "$ko" "$stage/modules/$name"
        echo "$name" >>"$stage/modules/order"
      done
  done
}
