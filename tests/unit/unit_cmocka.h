/*
 * unit_cmocka.h - cmocka for the unit tests, with its assertions spelled out
 * for clang's static analyzer.
 *
 * A failed cmocka assertion leaves the test (cmocka jumps back into its
 * runner), but cmocka 1.1 does not declare its failure functions noreturn.
 * The analyzer run by clang-tidy (tests/lint.sh) therefore followed failed
 * assertions into the next line and reported what would happen there, such
 * as a null pointer that the assertion had just ruled out. When the analyzer
 * reads the tests (__clang_analyzer__), each assertion the tests use ends the
 * path where it fails, as it does at run time; compiled tests use cmocka's
 * own macros unchanged.
 */
#ifndef CLICKMART_UNIT_CMOCKA_H
#define CLICKMART_UNIT_CMOCKA_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#ifdef __clang_analyzer__
#include <stdlib.h>
#include <string.h>

#undef assert_true
#define assert_true(c) ((c) ? (void)0 : abort())
#undef assert_false
#define assert_false(c) ((c) ? abort() : (void)0)
#undef assert_non_null
#define assert_non_null(c) ((c) != NULL ? (void)0 : abort())
#undef assert_null
#define assert_null(c) ((c) == NULL ? (void)0 : abort())
/* cmocka compares both sides as its largest unsigned integer type. */
#undef assert_int_equal
#define assert_int_equal(a, b) ((uintmax_t)(a) == (uintmax_t)(b) ? (void)0 : abort())
#undef assert_ptr_equal
#define assert_ptr_equal(a, b) ((const void *)(a) == (const void *)(b) ? (void)0 : abort())
#undef assert_string_equal
#define assert_string_equal(a, b)                                                                  \
    (strcmp((const char *)(a), (const char *)(b)) == 0 ? (void)0 : abort())
#undef assert_string_not_equal
#define assert_string_not_equal(a, b)                                                              \
    (strcmp((const char *)(a), (const char *)(b)) != 0 ? (void)0 : abort())
#undef assert_memory_equal
#define assert_memory_equal(a, b, n)                                                               \
    (memcmp((const char *)(a), (const char *)(b), (n)) == 0 ? (void)0 : abort())
#undef fail
#define fail() abort()
#undef fail_msg
#define fail_msg(...) (print_error(__VA_ARGS__), abort())
#undef skip
#define skip() abort()
#endif

#endif
