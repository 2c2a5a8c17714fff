//! amm-worker (placeholder): see the issue "amm-worker: allocator-aware memory manager".
