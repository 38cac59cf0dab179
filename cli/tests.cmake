# cli/tests.cmake — ctest tests of the `fusedmoe` program; include()d from tests/cpp/CMakeLists.txt.
#   ctest --test-dir build -R cli_ --output-on-failure
# Each test runs the built program through cli/check_command.cmake, which checks the exit status
# and the output together.
if(NOT TARGET fusedmoe_cli)
  message(STATUS "fusedmoe: CLI tests skipped (FUSEDMOE_BUILD_CLI is OFF)")
  return()
endif()

set(fusedmoe_cli_dir "${CMAKE_CURRENT_LIST_DIR}")

# fusedmoe_cli_test(<name> EXIT <status> ARGS <args> [EXPECT <regex>] [FORBID <regex>]
#                   [FLAG_LINES <--flag ...>])
function(fusedmoe_cli_test test_name)
  cmake_parse_arguments(PARSE_ARGV 1 cli_test "" "EXIT;EXPECT;FORBID" "ARGS;FLAG_LINES")
  set(joined_args "")
  foreach(arg IN LISTS cli_test_ARGS)
    string(APPEND joined_args " \"${arg}\"")
  endforeach()
  set(script_args -DCOMMAND=$<TARGET_FILE:fusedmoe_cli> "-DARGS=${joined_args}"
                  -DEXPECT_EXIT=${cli_test_EXIT})
  if(DEFINED cli_test_EXPECT)
    list(APPEND script_args "-DEXPECT_REGEX=${cli_test_EXPECT}")
  endif()
  if(DEFINED cli_test_FORBID)
    list(APPEND script_args "-DFORBID_REGEX=${cli_test_FORBID}")
  endif()
  if(DEFINED cli_test_FLAG_LINES)
    list(JOIN cli_test_FLAG_LINES " " joined_flags)
    list(APPEND script_args "-DEXPECT_FLAG_LINES=${joined_flags}")
  endif()
  add_test(NAME ${test_name}
           COMMAND ${CMAKE_COMMAND} ${script_args} -P "${fusedmoe_cli_dir}/check_command.cmake")
  set_tests_properties(${test_name} PROPERTIES LABELS cli TIMEOUT 120)
endfunction()

# The default run: CPU backend (no GPU in CI), checked against the naive reference.
fusedmoe_cli_test(cli_run_defaults EXIT 0 ARGS run
  EXPECT "backend: [a-z]+ \\([^)]+\\).*config +H=256 I=512 E=8 k=2.*forward.*backward.*y +131072 .* PASS.*d_w2 .* PASS.*tokens dropped.*aux loss.*expert load.*result: PASS"
  FORBID "FAIL")

fusedmoe_cli_test(cli_help EXIT 0 ARGS --help EXPECT "usage: fusedmoe <command>.*run.*version.*--top-k")
fusedmoe_cli_test(cli_version EXIT 0 ARGS version EXPECT "fusedmoe [0-9]+\\.[0-9]+\\.[0-9]+")
fusedmoe_cli_test(cli_no_command EXIT 2 ARGS EXPECT "usage: fusedmoe")
fusedmoe_cli_test(cli_unknown_command EXIT 2 ARGS frobnicate
  EXPECT "fusedmoe: error: unknown command 'frobnicate'")

# `run --help` documents every flag with its default.
fusedmoe_cli_test(cli_run_help_lists_flags EXIT 0 ARGS run --help
  FLAG_LINES --hidden-size --ffn-size --num-experts --top-k --ffn --gate --renormalize
             --capacity-factor --num-shared-experts --shared-ffn-size --expert-bias --gate-bias
             --jitter-eps --dtype --fp32-math --world-size --expert-placement --config --tokens
             --seed --backend --training --gate-scale --iters --no-check --tolerance --transport
             --nccl-id-file)

# Bad input: exit status 2 and a message naming the field or flag; never a crash.
fusedmoe_cli_test(cli_bad_top_k EXIT 2 ARGS run --top-k 0 EXPECT "fusedmoe: error: .*top_k")
fusedmoe_cli_test(cli_bad_hidden_size_text EXIT 2 ARGS run --hidden-size abc
  EXPECT "fusedmoe: error: .*hidden_size.*abc")
fusedmoe_cli_test(cli_bad_gate_kind EXIT 2 ARGS run --gate fancy EXPECT "fusedmoe: error: .*gate.*fancy")
fusedmoe_cli_test(cli_bad_tokens EXIT 2 ARGS run --tokens -5 EXPECT "fusedmoe: error: --tokens")
fusedmoe_cli_test(cli_missing_value EXIT 2 ARGS run --num-experts
  EXPECT "fusedmoe: error: --num-experts needs a value")
fusedmoe_cli_test(cli_unknown_flag EXIT 2 ARGS run --no-such-flag 3
  EXPECT "fusedmoe: error: unknown flag '--no-such-flag'")
fusedmoe_cli_test(cli_unknown_flag_suggestion EXIT 2 ARGS run --top_k 2
  EXPECT "unknown flag '--top_k' \\(did you mean --top-k\\?\\)")
fusedmoe_cli_test(cli_too_large EXIT 2 ARGS run --hidden-size 1000000000 --ffn-size 1000000000
  EXPECT "fusedmoe: error: this run needs about .* GiB of host memory")
fusedmoe_cli_test(cli_missing_config_file EXIT 2 ARGS run --config no/such/file.cfg
  EXPECT "fusedmoe: error: config file 'no/such/file.cfg'")

# A failed check exits with status 1 (no error is 0 in floating point at tolerance 0).
fusedmoe_cli_test(cli_failed_check_exit_status EXIT 1
  ARGS run --tolerance 0 --hidden-size 32 --ffn-size 48 --tokens 64
  EXPECT "dx .* FAIL.*result: FAIL")
fusedmoe_cli_test(cli_bad_tolerance EXIT 2 ARGS run --tolerance -1 EXPECT "fusedmoe: error: --tolerance")

# A config file, with a flag after it overriding one of its keys.
fusedmoe_cli_test(cli_config_file EXIT 0
  ARGS run --config "${fusedmoe_cli_dir}/testdata/small.cfg" --top-k 2 --tokens 200
  EXPECT "config +H=48 I=80 E=6 k=2 ffn=gelu gate=sigmoid .*shared=1x40 dtype=fp32.*d_b1 .* PASS.*d_shared_b2 .* PASS.*result: PASS"
  FORBID "FAIL")

# Four emulated ranks, GShard top-2 with capacity 1.0: tokens are dropped, checks still pass.
fusedmoe_cli_test(cli_world_size_4_gshard EXIT 0
  ARGS run --world-size 4 --capacity-factor 1.0 --gate gshard --top-k 2
  EXPECT "W=4.*tokens +512 \\(per rank: 128 128 128 128\\).*result: PASS" FORBID "FAIL")

# The fused layer's protocol on one CPU thread per rank, against the naive reference.
fusedmoe_cli_test(cli_threads_backend_w4 EXIT 0
  ARGS run --backend threads --world-size 4 --capacity-factor 1.25 --num-shared-experts 1
  EXPECT "backend +threads.*result: PASS" FORBID "FAIL")

# Training-mode gates draw noise: every backend must draw the same.
fusedmoe_cli_test(cli_noisy_training EXIT 0
  ARGS run --gate noisy --training --hidden-size 64 --ffn-size 96 --tokens 300 --gate-bias
  EXPECT "noisy.*training.*d_noise_weight .* PASS.*result: PASS" FORBID "FAIL")
fusedmoe_cli_test(cli_switch_relu_fp32 EXIT 0
  ARGS run --gate switch --top-k 1 --training --ffn relu --expert-bias --dtype fp32
       --num-shared-experts 2 --capacity-factor 1.25 --hidden-size 64 --ffn-size 96 --tokens 257
       --world-size 2 --expert-placement 1,0,1,0,1,0,1,0 --iters 2
  EXPECT "result: PASS" FORBID "FAIL")
fusedmoe_cli_test(cli_zero_tokens EXIT 0 ARGS run --tokens 0 --hidden-size 32 --ffn-size 32
  EXPECT "result: PASS")
fusedmoe_cli_test(cli_no_check EXIT 0 ARGS run --no-check --hidden-size 64 --ffn-size 64
  EXPECT "check skipped.*result: PASS" FORBID "naive forward")

# --transport nccl: one process per GPU under a launcher; without one (or with another backend
# or an unknown transport) the command says what is missing. The NCCL runs themselves need a GPU
# (scripts/gpu_all.sh runs `mpirun -np 1 fusedmoe run --transport nccl`).
fusedmoe_cli_test(cli_transport_nccl_needs_a_launcher EXIT 2 ARGS run --transport nccl
  EXPECT "no launcher environment.*mpirun -np W")
fusedmoe_cli_test(cli_transport_nccl_fp32_only EXIT 2 ARGS run --transport nccl --dtype bf16
  EXPECT "--dtype bf16: this command runs fp32 across GPUs.*fused_torchrun.py")
set_tests_properties(cli_transport_nccl_fp32_only PROPERTIES ENVIRONMENT "RANK=0;WORLD_SIZE=1")
fusedmoe_cli_test(cli_transport_unknown EXIT 2 ARGS run --transport shm EXPECT "unknown transport 'shm'")
