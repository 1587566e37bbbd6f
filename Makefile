# mixbit Makefile. One binary, ./mixbit.
#
#   make              build ./mixbit (CUDA kernels compiled with nvcc when it is found)
#   make CUDA=0       build without CUDA: GPU entries return "built without CUDA"
#   make test         build and run every test program (tests/test_*.c); fails if any test fails
#   make check        what CI runs: make test (default build) then make asan
#   make asan         the tests under AddressSanitizer + UBSan (CPU code; CUDA=0)
#   make gpu-test     the GPU tests only (on a machine with a GPU), then once under compute-sanitizer
#   make bench-gpu    on a GPU machine: GPU tests, compute-sanitizer and the kernel benchmark in one go
#   make gpu-check    on a GPU machine: everything CUDA checked and measured (scripts/gpu-check.sh; run
#                     scripts/gpu-prepare.sh first on the developer machine and carry .gpu)
#   make fuzz         libFuzzer target for the safetensors header parser (clang), run with FUZZ_SECONDS
#   make fuzz-config  libFuzzer target for the config.json parser, seeded with ../shared's configs
#   make fuzz-measurement  libFuzzer target for the measurement.json reader
#   make fuzz-tokenizer  the same for the tokenizer.json reader
#   make fuzz-pickle  libFuzzer target for the PyTorch .bin reader (zip + pickle), seeded from the fixtures
#   make bench        build the benchmarks in bench/
#   make clean

NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA ?= $(if $(NVCC),1,0)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA_ARCH ?= -gencode arch=compute_90,code=sm_90

CC ?= cc
# OpenBLAS, OpenMP build (Debian libopenblas-openmp-dev): it shares the OpenMP thread pool instead of
# fighting it, and runs single-threaded when called inside a parallel region
BLAS_LIB ?= /usr/lib/x86_64-linux-gnu/openblas-openmp
BLAS_INC ?= /usr/include/x86_64-linux-gnu/openblas-openmp
BUILD ?= build$(if $(filter 0,$(CUDA)),-nocuda)
OPT ?= -O2 -march=native -fno-math-errno
SAN ?=
CFLAGS = $(OPT) -g $(SAN) -std=c11 -Wall -Wextra -Wno-unused-parameter -fopenmp -MMD -MP -D_GNU_SOURCE -I$(BLAS_INC)
LDLIBS = $(SAN) -ljansson -lcrypto -lz -lpcre2-8 -lutf8proc -L$(BLAS_LIB) -Wl,-rpath,$(BLAS_LIB) -lopenblas -lm -fopenmp

LIB_SRC = $(wildcard core/*.c formats/*.c calib/*.c quant/*.c convert/*.c)
CU_SRC = $(wildcard kernels/*.cu)
KERNEL_C = $(filter-out kernels/cuda_stub.c,$(wildcard kernels/*.c))

ifeq ($(CUDA),1)
CU_OBJ = $(CU_SRC:%.cu=$(BUILD)/%.o)
LIB_SRC += $(KERNEL_C)
LDLIBS += -L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lrt -lpthread -lstdc++
else
CU_OBJ =
LIB_SRC += $(KERNEL_C) kernels/cuda_stub.c
endif

LIB_OBJ = $(LIB_SRC:%.c=$(BUILD)/%.o) $(CU_OBJ)
CLI_OBJ = $(patsubst %.c,$(BUILD)/%.o,$(wildcard cli/*.c))
TEST_SRC = $(wildcard tests/test_*.c)
TEST_BIN = $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_SRC = $(wildcard bench/bench_*.c) bench/synth_model.c
BENCH_BIN = $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)

.PHONY: all test check asan gpu-test bench-gpu gpu-check fuzz fuzz-config fuzz-measurement fuzz-tokenizer fuzz-pickle bench clean
all: mixbit

mixbit: $(BUILD)/mixbit
	cp $< $@

$(BUILD)/mixbit: $(CLI_OBJ) $(BUILD)/libmixbit.a
	$(CC) $(CFLAGS) -o $@ $(CLI_OBJ) $(BUILD)/libmixbit.a $(LDLIBS)

$(BUILD)/libmixbit.a: $(LIB_OBJ)
	rm -f $@
	ar rcs $@ $^

$(BUILD)/%.o: %.c Makefile
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(BUILD)/%.o: %.cu Makefile
	@mkdir -p $(dir $@)
	$(NVCC) -O3 -std=c++17 $(CUDA_ARCH) -DMB_CUDA_LIB_DIR='"$(CUDA_HOME)/lib64"' -Xcompiler -Wall,-Wextra,-Wno-unused-parameter,-fPIC -MMD -MP -c -o $@ $<

$(BUILD)/tests/%: tests/%.c $(BUILD)/libmixbit.a tests/harness.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libmixbit.a $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(BUILD)/libmixbit.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libmixbit.a $(LDLIBS)

# Each test program prints "N passed, N failed, N skipped"; tests/run.sh adds them up.
test: $(BUILD)/mixbit $(TEST_BIN)
	@MIXBIT=$(BUILD)/mixbit $(if $(MB_ASAN),MB_ASAN=1) sh tests/run.sh $(TEST_BIN)

JOBS ?= $(shell nproc 2>/dev/null || echo 2)
check:
	$(MAKE) -j$(JOBS) test
	$(MAKE) -j$(JOBS) asan

asan:
	$(MAKE) BUILD=build-asan CUDA=0 OPT="-O1" SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
		test MB_ASAN=1

gpu-test: $(BUILD)/tests/test_kernels
	MB_REQUIRE_GPU=1 $(BUILD)/tests/test_kernels
	PATH=$$PATH:$(CUDA_HOME)/bin compute-sanitizer --error-exitcode 1 $(BUILD)/tests/test_kernels --quick

# One command for a lent GPU machine: GPU tests, compute-sanitizer, the kernel benchmark. Results go to
# $(GPU_OUT) (default bench/gpu-out): test log, sanitizer log, bench_kernels.md.
GPU_OUT ?= $(if $(OUT),$(OUT),bench/gpu-out)
bench-gpu: $(BUILD)/tests/test_kernels $(BUILD)/bench/bench_kernels
	@mkdir -p $(GPU_OUT)
	nvidia-smi > $(GPU_OUT)/nvidia-smi.txt 2>&1 || true
	MB_REQUIRE_GPU=1 $(BUILD)/tests/test_kernels > $(GPU_OUT)/gpu-test.log 2>&1; echo "exit $$?" >> $(GPU_OUT)/gpu-test.log
	PATH=$$PATH:$(CUDA_HOME)/bin compute-sanitizer --error-exitcode 1 $(BUILD)/tests/test_kernels --quick > $(GPU_OUT)/sanitizer.log 2>&1; echo "exit $$?" >> $(GPU_OUT)/sanitizer.log
	$(BUILD)/bench/bench_kernels > $(GPU_OUT)/bench_kernels.md 2>&1; echo "exit $$?" >> $(GPU_OUT)/bench_kernels.md
	tail -3 $(GPU_OUT)/gpu-test.log $(GPU_OUT)/sanitizer.log; cat $(GPU_OUT)/bench_kernels.md

gpu-check:
	OUT=$(GPU_OUT) bash scripts/gpu-check.sh

FUZZ_SECONDS ?= 60
fuzz:
	@mkdir -p fuzz/corpus
	clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -std=c11 -I. -o fuzz/fuzz_safetensors \
		tests/fuzz_safetensors.c formats/safetensors.c core/core.c -ljansson -lm
	./fuzz/fuzz_safetensors -max_total_time=$(FUZZ_SECONDS) -max_len=4096 fuzz/corpus

FUZZ_CC = clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -D_GNU_SOURCE -std=c11 -I.
fuzz-config:
	@mkdir -p fuzz/corpus-config
	for m in ../shared/models/*/config.json; do [ -f "$$m" ] && cp -n "$$m" fuzz/corpus-config/seed-$$(basename $$(dirname "$$m")).json; done; true
	$(FUZZ_CC) -o fuzz/fuzz_config tests/fuzz_config.c formats/model.c formats/safetensors.c core/core.c -ljansson -lm
	./fuzz/fuzz_config -max_total_time=$(FUZZ_SECONDS) -max_len=8192 -rss_limit_mb=2048 -malloc_limit_mb=512 -dict=tests/fuzz-seeds/config.dict fuzz/corpus-config

fuzz-measurement:
	@mkdir -p fuzz/corpus-measurement
	cp -n tests/fuzz-seeds/measurement-*.json fuzz/corpus-measurement/
	$(FUZZ_CC) -o fuzz/fuzz_measurement tests/fuzz_measurement.c quant/measurement.c quant/settings.c formats/exl2.c formats/safetensors.c core/core.c -ljansson -lm
	./fuzz/fuzz_measurement -max_total_time=$(FUZZ_SECONDS) -max_len=16384 -rss_limit_mb=2048 -malloc_limit_mb=512 -dict=tests/fuzz-seeds/measurement.dict fuzz/corpus-measurement

# libFuzzer target for the tokenizer.json reader (clang), seeded with the ../shared tokenizers and every golden
# variant (vocabularies cut short): make fuzz-tokenizer FUZZ_SECONDS=600
fuzz-tokenizer:
	@mkdir -p fuzz/corpus-tokenizer
	clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -std=c11 -I. -o fuzz/fuzz_tokenizer \
		tests/fuzz_tokenizer.c formats/tokenizer.c core/core.c -ljansson -lpcre2-8 -lutf8proc -lz -lm
	$(CC) -O1 -std=c11 -D_GNU_SOURCE -o fuzz/fuzz_tokenizer_seeds tests/fuzz_tokenizer_seeds.c -ljansson
	./fuzz/fuzz_tokenizer_seeds fuzz/corpus-tokenizer
	./fuzz/fuzz_tokenizer -max_total_time=$(FUZZ_SECONDS) -max_len=16384 -timeout=20 -dict=tests/fuzz_tokenizer.dict fuzz/corpus-tokenizer

# Seeds: state dicts and archives written by the target built as a seed program, the small fixture archives,
# the legacy file's head, and the fixtures' data.pkl (when unzip is present). New inputs go to fuzz/corpus-pickle, crashes to fuzz/.
MB_SHARED ?= ../shared
fuzz-pickle:
	@mkdir -p fuzz/corpus-pickle fuzz/seeds-pickle
	clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -std=c11 -I. -o fuzz/fuzz_pickle \
		tests/fuzz_pickle.c formats/torchbin.c formats/safetensors.c core/core.c -ljansson -lz -lm
	$(CC) -g -O1 -DFUZZ_SEED_MAIN -D_GNU_SOURCE -std=c11 -I. -o fuzz/fuzz_pickle_seeds \
		tests/fuzz_pickle.c formats/torchbin.c formats/safetensors.c core/core.c -ljansson -lz -lm
	./fuzz/fuzz_pickle_seeds fuzz/seeds-pickle
	T=$(MB_SHARED)/models/stories260K-torchbin; cp $$T/malicious-*.bin fuzz/seeds-pickle/; head -c 4096 $$T/legacy-format.bin > fuzz/seeds-pickle/legacy-head; \
	if command -v unzip >/dev/null; then for f in $$T/pytorch_model.bin $$T/tied-shared-storage.bin $$T/sharded-bf16/*.bin; do \
		unzip -p $$f '*/data.pkl' > fuzz/seeds-pickle/pkl-$$(basename $$f .bin); done; fi
	./fuzz/fuzz_pickle -max_total_time=$(FUZZ_SECONDS) -max_len=8192 -artifact_prefix=fuzz/ fuzz/corpus-pickle fuzz/seeds-pickle

bench: $(BENCH_BIN)

clean:
	rm -rf build build-nocuda build-asan mixbit fuzz

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
