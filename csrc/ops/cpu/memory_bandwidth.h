// How fast this machine reads memory: the ceiling a decode step, which reads every weight once,
// is measured against.
#pragma once

#include <cstddef>

namespace pg4 {

// Bytes per second that `threads` threads read, each streaming its own band of a buffer of
// `bytes` (far larger than the caches) and summing it, as a decode step streams its weights;
// the best of `passes` passes, after one that faults the buffer in.
double memory_read_bandwidth(int threads, size_t bytes, int passes);

}  // namespace pg4
