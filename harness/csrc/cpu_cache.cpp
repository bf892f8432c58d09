// A bounded caching pool in front of torch's CPU allocator (built and installed by
// harness/cpu_memory.py). Blocks of at least `min_bytes` are rounded up to 64 KiB bins; a freed
// block is kept for the next request of its bin, the oldest kept ones are handed back to
// malloc (which returns them to the OS under the 64 KiB mmap threshold) once more than
// `capacity` bytes are kept. A training step asks for the same few sizes layer after layer, so
// a pool of a few hundred MiB serves most requests without a fresh mapping's page faults.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <cstddef>
#include <list>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr size_t kBin = 64 * 1024;

using Kept = std::list<std::pair<size_t, void*>>;  // (bytes, block), oldest first

struct Pool {
  size_t capacity = 0, min_bytes = 0;
  size_t kept = 0, in_use = 0, peak = 0, kept_at_peak = 0;  // pooled bytes
  size_t hits = 0, misses = 0, evictions = 0;
  std::mutex mutex;
  std::unordered_map<void*, size_t> sizes;  // every pooled block, in use or kept
  Kept order;
  std::unordered_map<size_t, std::vector<Kept::iterator>> bins;

  void note_peak() {
    if (in_use + kept > peak) {
      peak = in_use + kept;
      kept_at_peak = kept;
    }
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex);
    in_use += bytes;
    auto bin = bins.find(bytes);
    if (bin == bins.end() || bin->second.empty()) {
      ++misses;
      note_peak();
      return nullptr;
    }
    Kept::iterator entry = bin->second.back();
    bin->second.pop_back();
    void* block = entry->second;
    order.erase(entry);
    kept -= bytes;
    ++hits;
    return block;
  }

  void track(void* block, size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex);
    sizes[block] = bytes;
  }

  // The oldest kept block, out of the pool; appended to `out` for freeing outside the lock.
  void evict_oldest(std::vector<void*>& out) {
    Kept::iterator oldest = order.begin();
    std::vector<Kept::iterator>& bin = bins[oldest->first];
    for (auto it = bin.begin(); it != bin.end(); ++it) {
      if (*it == oldest) {
        bin.erase(it);
        break;
      }
    }
    kept -= oldest->first;
    sizes.erase(oldest->second);
    out.push_back(oldest->second);
    order.erase(oldest);
    ++evictions;
  }

  void give_back(void* block) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> guard(mutex);
      auto found = sizes.find(block);
      if (found == sizes.end()) {
        to_free.push_back(block);  // below min_bytes: never pooled
      } else {
        size_t bytes = found->second;
        in_use -= bytes;
        if (bytes > capacity) {
          sizes.erase(found);
          to_free.push_back(block);
        } else {
          while (kept + bytes > capacity && !order.empty()) evict_oldest(to_free);
          order.emplace_back(bytes, block);
          bins[bytes].push_back(std::prev(order.end()));
          kept += bytes;
        }
      }
    }
    for (void* ptr : to_free) c10::free_cpu(ptr);
  }
};

Pool pool;

// torch.profiler's memory events, as torch's own CPU allocator reports them (a no-op unless profiling).
void release(void* block) {
  c10::profiledCPUMemoryReporter().Delete(block);
  pool.give_back(block);
}

struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* block = nullptr;
    if (n > 0 && n >= pool.min_bytes) {
      size_t bytes = (n + kBin - 1) / kBin * kBin;
      block = pool.take(bytes);
      if (block == nullptr) {
        block = c10::alloc_cpu(bytes);
        pool.track(block, bytes);
      }
    } else {
      block = c10::alloc_cpu(n);
    }
    c10::profiledCPUMemoryReporter().New(block, n);
    return {block, block, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator allocator;

// fork() while another thread holds the lock would leave the child's pool locked forever.
void before_fork() { pool.mutex.lock(); }
void after_fork() { pool.mutex.unlock(); }

}  // namespace

extern "C" {

// Installs the pool as torch's CPU allocator; a second call only changes the capacity.
void harness_cpu_cache_install(size_t capacity, size_t min_bytes) {
  static bool installed = false;
  std::vector<void*> to_free;
  {
    std::lock_guard<std::mutex> guard(pool.mutex);
    pool.capacity = capacity;
    pool.min_bytes = min_bytes;
    while (pool.kept > capacity && !pool.order.empty()) pool.evict_oldest(to_free);
  }
  for (void* ptr : to_free) c10::free_cpu(ptr);
  if (!installed) {
    pthread_atfork(before_fork, after_fork, after_fork);
    c10::SetCPUAllocator(&allocator, /*priority=*/100);
    installed = true;
  }
}

// out: kept, in use, peak of (in use + kept), kept at that peak, hits, misses, evictions.
void harness_cpu_cache_stats(size_t* out, int reset_peak) {
  std::lock_guard<std::mutex> guard(pool.mutex);
  size_t values[] = {pool.kept, pool.in_use, pool.peak, pool.kept_at_peak, pool.hits, pool.misses, pool.evictions};
  for (int i = 0; i < 7; ++i) out[i] = values[i];
  if (reset_peak) {
    pool.peak = pool.in_use + pool.kept;
    pool.kept_at_peak = pool.kept;
  }
}
}
