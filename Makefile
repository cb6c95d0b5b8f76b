# libpresence - one plain Makefile.
#
#   make            build the library, presenced, presencectl, the simulator
#   make check      unit, multi-process and crash tests; then again under
#                   AddressSanitizer + UBSan, and the threaded tests under
#                   ThreadSanitizer
#   make bench      benchmarks beside their baselines (DRAM load, LMDB, cds_lfht)
#   make demo       a daemon and a simulated load on a private store
#   make install    PREFIX=/usr/local DESTDIR=

PREFIX  ?= /usr/local
LIBDIR  ?= $(PREFIX)/lib
INCDIR  ?= $(PREFIX)/include
BINDIR  ?= $(PREFIX)/bin
MANDIR  ?= $(PREFIX)/share/man
DESTDIR ?=

CC      ?= cc
AR      ?= ar
CFLAGS  ?= -O2 -g
SAN     ?=
BUILD   ?= build

MAJOR   := 0
VERSION := 0.1.0

ALL_CFLAGS  = -std=c11 -Wall -Wextra -Werror -D_GNU_SOURCE -fPIC -MMD -MP \
              -Iinclude -Ilib $(CFLAGS) $(SAN)
ALL_LDFLAGS = $(LDFLAGS) $(SAN)

ifeq ($(V),1)
Q :=
else
Q := @
endif

LIB_SRC    := $(sort $(wildcard lib/*.c))
DAEMON_SRC := $(sort $(wildcard daemon/*.c))
TEST_SRC   := $(sort $(wildcard tests/test_*.c))
TEST_LIB   := $(sort $(filter-out $(TEST_SRC),$(wildcard tests/*.c)))

LIB_OBJ    := $(LIB_SRC:%.c=$(BUILD)/%.o)
DAEMON_OBJ := $(DAEMON_SRC:%.c=$(BUILD)/%.o)
TEST_BIN   := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TESTLIB_OBJ := $(TEST_LIB:%.c=$(BUILD)/%.o)

SO      := $(BUILD)/libpresence.so
SONAME  := libpresence.so.$(MAJOR)
A       := $(BUILD)/libpresence.a
DEPS_OK := build/.deps-ok

PROGS := $(BUILD)/presenced $(BUILD)/presencectl $(BUILD)/presence-sim

.PHONY: all check check-plain check-asan check-tsan tests bench demo install \
        uninstall clean deps

all: $(DEPS_OK) $(SO) $(A) $(PROGS) $(BUILD)/presence.pc

# Missing Debian packages: installed when run as root, else named.
$(DEPS_OK): tools/deps.sh
	$(Q)sh tools/deps.sh
	$(Q)mkdir -p build && touch $@

deps:
	$(Q)sh tools/deps.sh

$(BUILD)/%.o: %.c $(DEPS_OK)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(ALL_CFLAGS) -c -o $@ $<

# Internals are hidden from the shared object; the API is marked PRES_API.
$(BUILD)/lib/%.o: ALL_CFLAGS += -fvisibility=hidden

$(SO): $(LIB_OBJ)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -shared -Wl,-soname,$(SONAME) -o $@.$(VERSION) $^ $(ALL_LDFLAGS) -llmdb -lpthread
	$(Q)ln -sf libpresence.so.$(VERSION) $(BUILD)/$(SONAME)
	$(Q)ln -sf libpresence.so.$(VERSION) $@

$(A): $(LIB_OBJ)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && $(AR) rcs $@ $^

# The programs link the static library: the daemon and the tools use lib/'s
# private interfaces, which the shared object does not export.
$(BUILD)/presenced: $(DAEMON_OBJ) $(A)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(ALL_LDFLAGS) -llmdb -lpthread

$(BUILD)/presencectl: $(BUILD)/tools/presencectl.o $(A)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(ALL_LDFLAGS) -llmdb -lpthread

$(BUILD)/presence-sim: $(BUILD)/tools/presence-sim.o $(A)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(ALL_LDFLAGS) -llmdb -lpthread

$(BUILD)/tests/%: $(BUILD)/tests/%.o $(TESTLIB_OBJ) $(A)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(ALL_LDFLAGS) -lcmocka -llmdb -lpthread

# test_db drives the daemon's writer of the LMDB mirror directly: it links
# daemon/db.o, ahead of the library whose record codec that object uses.
# test_mirror reads the mirror the daemon's way too, once it has stopped.
$(BUILD)/tests/test_db $(BUILD)/tests/test_mirror: $(BUILD)/tests/%: $(BUILD)/tests/%.o \
		$(BUILD)/daemon/db.o $(TESTLIB_OBJ) $(A)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(ALL_LDFLAGS) -lcmocka -llmdb -lpthread

$(BUILD)/bench/bench: $(BUILD)/bench/bench.o $(A)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(ALL_LDFLAGS) -llmdb -lurcu -lurcu-cds -lpthread -lm

$(BUILD)/presence.pc: Makefile
	@mkdir -p $(BUILD)
	$(Q)printf '%s\n' 'prefix=$(PREFIX)' 'libdir=$(LIBDIR)' 'includedir=$(INCDIR)' '' \
	  'Name: libpresence' 'Description: shared-memory presence store for the processes of one host' \
	  'Version: $(VERSION)' 'Libs: -L$${libdir} -lpresence' 'Libs.private: -llmdb -lpthread' \
	  'Cflags: -I$${includedir}' > $@

tests: all $(TEST_BIN)

# Threaded tests run again under ThreadSanitizer (test names ending in _mt).
TSAN_TESTS := $(filter %_mt,$(TEST_BIN:$(BUILD)/tests/%=%))

check: all
	$(Q)$(MAKE) --no-print-directory check-plain
	$(Q)$(MAKE) --no-print-directory check-asan
	$(Q)$(MAKE) --no-print-directory check-tsan

check-plain: tests
	$(Q)sh tests/run.sh $(BUILD) $(TEST_BIN:$(BUILD)/tests/%=%)

check-asan:
	$(Q)$(MAKE) --no-print-directory BUILD=build/asan \
	  SAN='-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all' \
	  CFLAGS='-O1 -g' tests
	$(Q)PRES_TEST_SANITIZED=1 ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  sh tests/run.sh build/asan $(notdir $(TEST_BIN))

check-tsan:
	$(Q)$(MAKE) --no-print-directory BUILD=build/tsan SAN='-fsanitize=thread -Wno-tsan' \
	  CFLAGS='-O1 -g' tests
	$(Q)PRES_TEST_SANITIZED=1 TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
	  sh tests/run.sh build/tsan $(TSAN_TESTS)

bench: all $(BUILD)/bench/bench
	$(Q)$(BUILD)/bench/bench

demo: all
	$(Q)sh tools/demo.sh $(BUILD)

install: all
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCDIR) $(DESTDIR)$(BINDIR) \
	  $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8
	install -m 0644 include/presence.h $(DESTDIR)$(INCDIR)/
	install -m 0755 $(SO).$(VERSION) $(DESTDIR)$(LIBDIR)/
	ln -sf libpresence.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf libpresence.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libpresence.so
	install -m 0644 $(A) $(DESTDIR)$(LIBDIR)/
	install -m 0644 $(BUILD)/presence.pc $(DESTDIR)$(LIBDIR)/pkgconfig/
	install -m 0755 $(BUILD)/presenced $(BUILD)/presencectl $(DESTDIR)$(BINDIR)/
	install -m 0644 doc/presencectl.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 doc/presenced.8 $(DESTDIR)$(MANDIR)/man8/

uninstall:
	rm -f $(DESTDIR)$(INCDIR)/presence.h $(DESTDIR)$(LIBDIR)/libpresence.so* \
	  $(DESTDIR)$(LIBDIR)/libpresence.a $(DESTDIR)$(LIBDIR)/pkgconfig/presence.pc \
	  $(DESTDIR)$(BINDIR)/presenced $(DESTDIR)$(BINDIR)/presencectl \
	  $(DESTDIR)$(MANDIR)/man1/presencectl.1 $(DESTDIR)$(MANDIR)/man8/presenced.8

clean:
	rm -rf build

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
