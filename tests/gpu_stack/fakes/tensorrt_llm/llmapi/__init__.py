"""``KvCacheConfig``: strict, as in the release (unknown fields raise)."""


class KvCacheConfig:
    FIELDS = {"enable_block_reuse", "free_gpu_memory_fraction"}

    def __init__(self, **kwargs):
        unknown = set(kwargs) - self.FIELDS
        if unknown:
            raise TypeError(f"KvCacheConfig: unknown fields {sorted(unknown)}")
        self.__dict__.update(kwargs)
