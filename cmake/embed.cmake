# embed.cmake - turn a file into a C array, at build time:
#   cmake -DIN=daemon/page.html -DOUT=page_html.c -DNAME=clickmart_page_html -P embed.cmake
# defines `const unsigned char NAME[]` (NUL-terminated, not counted) and
# `const size_t NAME_len`. Used for the live page, so that it stays an
# editable HTML file and the binary needs no asset directory.
if(NOT IN OR NOT OUT OR NOT NAME)
  message(FATAL_ERROR "embed.cmake needs -DIN=... -DOUT=... -DNAME=...")
endif()
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" hexlen)
math(EXPR len "${hexlen} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
# 16 bytes per line keeps the generated file readable and compilers happy.
string(REGEX REPLACE "((0x[0-9a-f][0-9a-f],){16})" "\\1\n" bytes "${bytes}")
file(WRITE "${OUT}.tmp"
  "/* Generated from ${IN} by cmake/embed.cmake; do not edit. */\n"
  "#include <stddef.h>\n"
  "const unsigned char ${NAME}[] = {\n${bytes}0x00};\n"
  "const size_t ${NAME}_len = ${len};\n")
file(RENAME "${OUT}.tmp" "${OUT}")
