// Read-only memory bandwidth probe (benchmarks: the ceiling a decode kernel can reach).
//
// read_bytes: tensors[0] = a buffer of ints[0] bytes (a multiple of 64), read once, split over `threads` threads
// in contiguous chunks; writes the xor of all 64-byte lines (so no load can be dropped) as 8 uint64 to y.
static int read_bytes_call(const qc_call* c) {
    const uint64_t* p = (const uint64_t*)c->tensors[0];
    const int64_t words = c->ints[0] / 8;
    uint64_t result[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma omp parallel num_threads(c->threads)
    {
        uint64_t local[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma omp for schedule(static)
        for (int64_t i = 0; i < words; i += 8)
            for (int j = 0; j < 8; j++) local[j] ^= p[i + j];
#pragma omp critical
        for (int j = 0; j < 8; j++) result[j] ^= local[j];
    }
    memcpy(c->y, result, sizeof(result));
    return 0;
}
QC_KERNEL(read_bytes, read_bytes_call)
