/* Consumer of the packaged library (find_package, add_subdirectory and pkg-config builds):
 * creates a KV cache and runs a few llama.h memory calls through the C ABI. */
#include <stdio.h>
#include <string.h>

#include "llama-memory.h"

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            const char *err_ = llama_memory_last_error();                             \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__,  \
                    __LINE__, #cond, err_ ? err_ : "none");                           \
            return 1;                                                                 \
        }                                                                             \
    } while (0)

int main(void) {
    llama_memory_t mem = llama_memory_kv_init(llama_memory_kv_default_params());
    CHECK(mem != NULL);
    /* the header and the library agree */
    CHECK(strcmp(llama_memory_version(), LLAMA_MEMORY_VERSION) == 0);
    CHECK(llama_memory_kv_size(mem) == 256 && llama_memory_n_seq_max(mem) == 1);
    /* an empty cache */
    CHECK(llama_memory_seq_pos_min(mem, 0) == -1 && llama_memory_seq_pos_max(mem, 0) == -1);
    CHECK(llama_memory_can_shift(mem));
    CHECK(llama_memory_seq_rm(mem, 0, 0, -1));
    llama_memory_seq_add(mem, 0, 0, -1, 4);
    llama_memory_seq_keep(mem, 0);
    CHECK(llama_memory_kv_n_used(mem, 0) == 0);
    /* a sequence id outside [-1, n_seq_max): an error, not an abort */
    llama_memory_clear_last_error();
    CHECK(!llama_memory_seq_rm(mem, 7, 0, -1));
    CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    llama_memory_clear_last_error();
    llama_memory_clear(mem, true);
    llama_memory_free(mem);
    printf("ok: llama-memory %s\n", llama_memory_version());
    return 0;
}
