# cli/check_command.cmake — runs one command and checks its exit status and output (a ctest
# helper for cli/tests.cmake; ctest's PASS_REGULAR_EXPRESSION alone would ignore the status).
#   cmake -DCOMMAND=<program> -DARGS="<args, shell-quoted>" -DEXPECT_EXIT=<n>
#         [-DEXPECT_REGEX=<regex>] [-DFORBID_REGEX=<regex>]
#         [-DEXPECT_FLAG_LINES="<--flag --flag ...>"] -P check_command.cmake
# EXPECT_FLAG_LINES: each word must start a help line that also says "(default: ...)".
# Output is stdout and stderr together.
if(NOT DEFINED COMMAND OR NOT DEFINED EXPECT_EXIT)
  message(FATAL_ERROR "check_command.cmake: COMMAND and EXPECT_EXIT are required")
endif()
separate_arguments(command_args UNIX_COMMAND "${ARGS}")
execute_process(COMMAND "${COMMAND}" ${command_args}
                RESULT_VARIABLE exit_status
                OUTPUT_VARIABLE command_output
                ERROR_VARIABLE command_output)
message("$ ${COMMAND} ${ARGS}\n${command_output}\n(exit status ${exit_status})")

set(failures "")
if(NOT exit_status STREQUAL "${EXPECT_EXIT}")
  string(APPEND failures "exit status ${exit_status}, expected ${EXPECT_EXIT}\n")
endif()
if(DEFINED EXPECT_REGEX AND NOT command_output MATCHES "${EXPECT_REGEX}")
  string(APPEND failures "output does not match '${EXPECT_REGEX}'\n")
endif()
if(DEFINED FORBID_REGEX AND command_output MATCHES "${FORBID_REGEX}")
  string(APPEND failures "output matches the forbidden '${FORBID_REGEX}'\n")
endif()
if(DEFINED EXPECT_FLAG_LINES)
  separate_arguments(flag_names UNIX_COMMAND "${EXPECT_FLAG_LINES}")
  foreach(flag_name IN LISTS flag_names)
    if(NOT command_output MATCHES "\n  ${flag_name}[ =][^\n]*\\(default: [^\n]+\\)")
      string(APPEND failures "help has no line '  ${flag_name} ... (default: ...)'\n")
    endif()
  endforeach()
endif()
if(failures)
  message(FATAL_ERROR "check failed:\n${failures}")
endif()
