# mixbit Makefile. One binary, ./mixbit.
#
#   make              build ./mixbit (CUDA kernels compiled with nvcc when it is found)
#   make CUDA=0       build without CUDA: GPU entries return "built without CUDA"
#   make test         build and run every test program (tests/test_*.c); fails if any test fails
#   make check        what CI runs: make test (default build) then make asan
#   make asan         the tests under AddressSanitizer + UBSan (CPU code; CUDA=0)
#   make gpu-test     the GPU tests only (on a machine with a GPU), then once under compute-sanitizer
#   make bench-gpu    on a GPU machine: GPU tests, compute-sanitizer and the kernel benchmark in one go
#   make fuzz         libFuzzer target for the safetensors header parser (clang), run with FUZZ_SECONDS
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
LDLIBS = $(SAN) -ljansson -lcrypto -lz -lpcre2-8 -L$(BLAS_LIB) -Wl,-rpath,$(BLAS_LIB) -lopenblas -lm -fopenmp

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

.PHONY: all test check asan gpu-test bench-gpu fuzz bench clean
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

check:
	$(MAKE) test
	$(MAKE) asan

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

FUZZ_SECONDS ?= 60
fuzz:
	@mkdir -p fuzz/corpus
	clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -std=c11 -I. -o fuzz/fuzz_safetensors \
		tests/fuzz_safetensors.c formats/safetensors.c core/core.c -ljansson -lm
	./fuzz/fuzz_safetensors -max_total_time=$(FUZZ_SECONDS) -max_len=4096 fuzz/corpus

bench: $(BENCH_BIN)

clean:
	rm -rf build build-nocuda build-asan mixbit fuzz

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
