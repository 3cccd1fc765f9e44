// What the CPU kernels' AMX loops share (included by their .cc files; pallas_kernels.cpu_ffi hashes
// this header with each of them):
//
// TileConfig          the 64-byte tile configuration _tile_loadconfig takes (palette 1): per tile
//                     register t, rows[t] rows of colsb[t] bytes
// tile_state_granted()  whether Linux grants the process the AMX tile state (arch_prctl
//                       ARCH_REQ_XCOMP_PERM; asked once per process). Callers check the instructions
//                       themselves: __builtin_cpu_supports("amx-int8") or ("amx-bf16").

#ifndef JAXINFER_CPU_AMX_H_
#define JAXINFER_CPU_AMX_H_

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace jaxinfer {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline bool tile_state_granted() {
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // arch_prctl: request AMX tile data
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return granted;
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_AMX_H_
