/* luanbd.lua._lualib: faster versions of Lua standard library functions, same results.
 *
 * table.concat is how Lua plugins build a reply out of pieces (ram.lua joins 64 pages
 * for every 256 KiB read).  Lua 5.4's own version appends the pieces to a buffer that
 * grows by half again each time it is full (about 2x the result copied by reallocs and
 * re-faulted pages for a 256 KiB result), then copies it into the string.  This one
 * measures the pieces first and copies them into a buffer of the final size; a profile of
 * nbdcopy against ram.lua had table.concat's memmove at a third of the server's time.
 *
 * It is Lua 5.4's tconcat (ltablib.c) with one fast path in front: a table without a
 * metatable whose items in [i, j] are all strings.  Everything else (a metatable, numbers,
 * a bad value, bad arguments) runs the port of the original code, so errors and
 * metamethod calls are exactly Lua's (tests/lua/test_lualib.py compares both on the same
 * build).  The one difference: needing less memory, it can succeed under --lua-memory-limit
 * where Lua's own would have run out.
 *
 * The Lua C API comes from the lupa module that runs the script: its Lua functions are
 * exported, so bind() looks them up with dlsym in that very module (never another Lua
 * library, whose state layout might differ).  Lua reaches luanbd_table_concat through
 * package.loadlib on this file, the standard way to give Lua a C function.
 *
 * bind(path) -> bool: True when every function was found and the module is Lua 5.4.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

/* Lua 5.4's C API as far as it is used here (lua.h, lauxlib.h). */
typedef struct lua_State lua_State;
typedef long long lua_Integer;
typedef double lua_Number;
typedef int (*lua_CFunction)(lua_State *);
typedef void *(*lua_Alloc)(void *ud, void *ptr, size_t osize, size_t nsize);

/* lauxlib.h's luaL_Stream: the userdata of a Lua file handle ("FILE*"). */
typedef struct luaL_Stream {
    FILE *f;
    lua_CFunction closef;  /* NULL: a closed file */
} luaL_Stream;

#define LUA_TNIL 0
#define LUA_TNUMBER 3
#define LUA_TSTRING 4
#define LUA_TTABLE 5

/* luaL_Buffer's fields before the initial buffer are its ABI; the initial buffer is
 * LUAL_BUFFERSIZE (1 KiB on 64-bit builds) in Lua, bigger here so that any build fits. */
typedef struct luaL_Buffer {
    char *b;
    size_t size;
    size_t n;
    lua_State *L;
    union {
        lua_Number n;
        double u;
        void *s;
        lua_Integer i;
        long l;
        char b[8192];
    } init;
} luaL_Buffer;

static struct {
    lua_Number (*version)(lua_State *);
    int (*type)(lua_State *, int);
    const char *(*typename_)(lua_State *, int);
    int (*getmetatable)(lua_State *, int);
    int (*rawget)(lua_State *, int);
    int (*rawgeti)(lua_State *, int, lua_Integer);
    int (*geti)(lua_State *, int, lua_Integer);
    unsigned long long (*rawlen)(lua_State *, int);
    const char *(*tolstring)(lua_State *, int, size_t *);
    int (*isstring)(lua_State *, int);
    void (*settop)(lua_State *, int);
    void (*pushstring)(lua_State *, const char *);
    const char *(*pushlstring)(lua_State *, const char *, size_t);
    void (*pushinteger)(lua_State *, lua_Integer);
    lua_Integer (*len)(lua_State *, int);
    const char *(*optlstring)(lua_State *, int, const char *, size_t *);
    lua_Integer (*optinteger)(lua_State *, int, lua_Integer);
    void (*checktype)(lua_State *, int, int);
    int (*error)(lua_State *, const char *, ...);
    void (*buffinit)(lua_State *, luaL_Buffer *);
    char *(*buffinitsize)(lua_State *, luaL_Buffer *, size_t);
    void (*addlstring)(luaL_Buffer *, const char *, size_t);
    void (*addvalue)(luaL_Buffer *);
    void (*pushresult)(luaL_Buffer *);
    void (*pushresultsize)(luaL_Buffer *, size_t);
    int (*gettop)(lua_State *);
    int (*isinteger)(lua_State *, int);
    lua_Integer (*tointegerx)(lua_State *, int, int *);
    void *(*testudata)(lua_State *, int, const char *);
    lua_CFunction (*tocfunction)(lua_State *, int);
    void (*pushnil)(lua_State *);
    void (*rotate)(lua_State *, int, int);
    int (*fileresult)(lua_State *, int, const char *);
    lua_Alloc (*getallocf)(lua_State *, void **);
    void (*setallocf)(lua_State *, lua_Alloc, void *);
} api;

static int bound = 0;

/* luanbd_blank_string's source: address space that is never written, so every page of it
 * reads as the kernel's one zero page (no memory of its own, and cache-hot).  Mapped once
 * in bind(); BLANK_MAX is the largest request payload (MAX_REQUEST_SIZE). */
#define BLANK_MAX (64 * 1024 * 1024)
static const char *blank = NULL;

#define pop(L, n) api.settop(L, -(n) - 1)

/* ltablib.c's checktab for TAB_R | TAB_L: a table, or something with __index and __len. */
static int checkfield(lua_State *L, const char *key, int n)
{
    api.pushstring(L, key);
    return api.rawget(L, -n) != LUA_TNIL;
}

static lua_Integer aux_getn(lua_State *L)
{
    if (api.type(L, 1) != LUA_TTABLE) {
        int n = 1;
        if (api.getmetatable(L, 1) && checkfield(L, "__index", ++n)
            && checkfield(L, "__len", ++n))
            pop(L, n);
        else
            api.checktype(L, 1, LUA_TTABLE);  /* raises Lua's error */
    }
    return api.len(L, 1);
}

static void addfield(lua_State *L, luaL_Buffer *b, lua_Integer i)
{
    api.geti(L, 1, i);
    if (!api.isstring(L, -1))
        api.error(L, "invalid value (%s) at index %I in table for 'concat'",
                  api.typename_(L, api.type(L, -1)), i);
    api.addvalue(b);
}

/* A plain table (no metatable) with strings only in [i, last]: the exact size first. */
static int concat_strings(lua_State *L, const char *sep, size_t lsep, lua_Integer i,
                          lua_Integer last)
{
    size_t total = 0, len;
    lua_Integer k;
    luaL_Buffer b;
    char *p;

    if (api.type(L, 1) != LUA_TTABLE)
        return 0;
    if (api.getmetatable(L, 1)) {
        pop(L, 1);
        return 0;
    }
    for (k = i;; k++) {
        if (api.rawgeti(L, 1, k) != LUA_TSTRING) {
            pop(L, 1);
            return 0;
        }
        len = (size_t)api.rawlen(L, -1);
        pop(L, 1);
        if (total + len < total)
            return 0;
        total += len;
        if (k == last)
            break;
        if (total + lsep < total)
            return 0;
        total += lsep;
    }
    p = api.buffinitsize(L, &b, total);
    for (k = i;; k++) {
        const char *s;
        api.rawgeti(L, 1, k);
        s = api.tolstring(L, -1, &len);
        memcpy(p, s, len);
        p += len;
        pop(L, 1);
        if (k == last)
            break;
        memcpy(p, sep, lsep);
        p += lsep;
    }
    api.pushresultsize(&b, total);
    return 1;
}

__attribute__((visibility("default"))) int luanbd_table_concat(lua_State *L)
{
    luaL_Buffer b;
    lua_Integer last = aux_getn(L);
    size_t lsep;
    const char *sep = api.optlstring(L, 2, "", &lsep);
    lua_Integer i = api.optinteger(L, 3, 1);
    last = api.optinteger(L, 4, last);
    if (i <= last && concat_strings(L, sep, lsep, i, last))
        return 1;
    api.buffinit(L, &b);
    for (; i < last; i++) {
        addfield(L, &b, i);
        api.addlstring(&b, sep, lsep);
    }
    if (i == last)
        addfield(L, &b, i);
    api.pushresult(&b);
    return 1;
}

/* What install() calls once through Lua before trusting this file's luaL_Buffer: the size
 * of the initial buffer luaL_buffinit sets up (it writes nothing into it), which must fit
 * in ours.  Lua's default is 1 KiB; a build configured with more than 8 KiB is refused. */
__attribute__((visibility("default"))) int luanbd_lualib_probe(lua_State *L)
{
    luaL_Buffer b;
    api.buffinit(L, &b);
    pop(L, 1);  /* the placeholder buffinit pushed */
    api.pushinteger(L, (lua_Integer)b.size);
    api.pushinteger(L, (lua_Integer)sizeof b.init);
    return 2;
}

/* A new string of n bytes for a WRITE payload or a file read to be received into
 * (lua/pinning.py): its bytes are unspecified, and the caller overwrites every one before
 * any Lua code sees the string.
 *
 * lua_pushlstring is the only way to a string of a given size that allocates just the
 * string (string.rep and luaL_Buffer build it in a buffer first and copy that), but it
 * copies its source into the new string: for a 1 MiB payload that copy cost as much as
 * the script's own work on it.  So the string's memory is allocated first, by the state's
 * own allocator (its accounting and limit apply as usual), and handed to Lua when it asks
 * for exactly that block (a long string: its header, n bytes and a NUL), with the new
 * string's contents as the source: glibc's memcpy returns at once when source and
 * destination are the same, and any memcpy leaves the bytes as they are.  Should Lua not
 * ask (a build whose strings differ), the block is given back, the string is made from
 * the zero page as before and the hand-off is not tried again. */
#define LNGSTR_HEADER 24  /* offsetof(TString, contents) of a 5.4 long string, 64-bit, as
                            lua/pinning.py's CONTENTS_OFFSET (checked here by address) */
#define MAXSHORTLEN 40    /* LUAI_MAXSHORTLEN: shorter strings are interned, and must be
                             made from their bytes */

struct handoff {
    lua_Alloc alloc;
    void *ud;
    char *block;
    size_t size;
    int taken;
};

static int handoff_ok = 1;

static void *handoff_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    struct handoff *h = ud;
    if (!h->taken && ptr == NULL && osize == LUA_TSTRING && nsize == h->size) {
        h->taken = 1;
        return h->block;
    }
    return h->alloc(h->ud, ptr, osize, nsize);
}

static int blank_handoff(lua_State *L, size_t n)
{
    struct handoff h = {NULL, NULL, NULL, LNGSTR_HEADER + n + 1, 0};
    h.alloc = api.getallocf(L, &h.ud);
    h.block = h.alloc(h.ud, NULL, LUA_TSTRING, h.size);
    if (h.block == NULL)
        return 0;  /* no memory: lua_pushlstring below raises Lua's error */
    api.setallocf(L, handoff_alloc, &h);
    api.pushlstring(L, h.block + LNGSTR_HEADER, n);  /* cannot raise: its memory is here */
    api.setallocf(L, h.alloc, h.ud);
    if (h.taken && api.tolstring(L, -1, NULL) == h.block + LNGSTR_HEADER)
        return 1;
    if (!h.taken)
        h.alloc(h.ud, h.block, h.size, 0);
    pop(L, 1);  /* made from the block's unspecified bytes elsewhere: not this one */
    handoff_ok = 0;
    return 0;
}

__attribute__((visibility("default"))) int luanbd_blank_string(lua_State *L)
{
    lua_Integer n = api.optinteger(L, 1, 0);
    if (n < 0 || n > BLANK_MAX || blank == NULL)
        return api.error(L, "blank string of %I bytes: out of range", n);
    if (n > MAXSHORTLEN && handoff_ok && blank_handoff(L, (size_t)n))
        return 1;
    api.pushlstring(L, blank, (size_t)n);
    return 1;
}

/* file:read(n) for a big n, straight into the string it returns.
 *
 * Lua's read_chars (liolib.c) reads into a luaL_Buffer and then copies that into the
 * string: a 64 MiB read holds 128 MiB for a moment and copies 64 MiB, on the thread that
 * runs the script.  This one reads into a new string of n bytes (luanbd_blank_string's way
 * of making it, before any Lua code sees it) and copies only at the end of the file, when
 * fewer bytes came.  Every other call -- any other format, more arguments, a small count, a
 * closed file, not a file -- is Lua's own read, called with this very stack, so results and
 * errors are Lua's. */
#define READ_DIRECT_MIN (64 * 1024)
static lua_CFunction lua_read = NULL;

__attribute__((visibility("default"))) int luanbd_file_read(lua_State *L)
{
    luaL_Stream *stream;
    lua_Integer n;
    char *s;
    size_t got;
    int isnum = 0;

    if (api.gettop(L) != 2 || api.type(L, 2) != LUA_TNUMBER || !api.isinteger(L, 2)
        || blank == NULL)
        return lua_read(L);
    n = api.tointegerx(L, 2, &isnum);
    stream = api.testudata(L, 1, "FILE*");
    if (!isnum || n < READ_DIRECT_MIN || n > BLANK_MAX || stream == NULL
        || stream->closef == NULL)
        return lua_read(L);
    clearerr(stream->f);
    api.pushlstring(L, blank, (size_t)n);
    s = (char *)api.tolstring(L, -1, NULL);
    got = fread(s, 1, (size_t)n, stream->f);
    if (ferror(stream->f)) {
        pop(L, 1);
        return api.fileresult(L, 0, NULL);
    }
    if (got == 0) {  /* end of file: fail, as read_chars does */
        pop(L, 1);
        api.pushnil(L);
        return 1;
    }
    if (got < (size_t)n) {  /* the file ended: a string of what there was */
        api.pushlstring(L, s, got);
        api.rotate(L, -2, 1);
        pop(L, 1);
    }
    return 1;
}

/* install(original read): remember Lua's own file:read, which luanbd_file_read calls for
 * everything it does not do itself (the same function in every state of this library). */
__attribute__((visibility("default"))) int luanbd_file_read_install(lua_State *L)
{
    lua_CFunction original = api.tocfunction(L, 1);
    if (original == NULL || original == luanbd_file_read)
        return api.error(L, "luanbd_file_read_install: not Lua's file:read");
    lua_read = original;
    return 0;
}

static PyObject *bind(PyObject *self, PyObject *arg)
{
    const char *path = PyUnicode_AsUTF8(arg);
    void *lib;
    if (path == NULL)
        return NULL;
    if (bound)
        Py_RETURN_TRUE;
    /* The module is loaded already (lupa imported it): only its handle is wanted. */
    lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL)
        Py_RETURN_FALSE;
#define FIND(field, name)                                  \
    do {                                                   \
        *(void **)&api.field = dlsym(lib, name);           \
        if (api.field == NULL)                             \
            goto missing;                                  \
    } while (0)
    FIND(version, "lua_version");
    FIND(type, "lua_type");
    FIND(typename_, "lua_typename");
    FIND(getmetatable, "lua_getmetatable");
    FIND(rawget, "lua_rawget");
    FIND(rawgeti, "lua_rawgeti");
    FIND(geti, "lua_geti");
    FIND(rawlen, "lua_rawlen");
    FIND(tolstring, "lua_tolstring");
    FIND(isstring, "lua_isstring");
    FIND(settop, "lua_settop");
    FIND(pushstring, "lua_pushstring");
    FIND(pushlstring, "lua_pushlstring");
    FIND(pushinteger, "lua_pushinteger");
    FIND(len, "luaL_len");
    FIND(optlstring, "luaL_optlstring");
    FIND(optinteger, "luaL_optinteger");
    FIND(checktype, "luaL_checktype");
    FIND(error, "luaL_error");
    FIND(buffinit, "luaL_buffinit");
    FIND(buffinitsize, "luaL_buffinitsize");
    FIND(addlstring, "luaL_addlstring");
    FIND(addvalue, "luaL_addvalue");
    FIND(pushresult, "luaL_pushresult");
    FIND(pushresultsize, "luaL_pushresultsize");
    FIND(gettop, "lua_gettop");
    FIND(isinteger, "lua_isinteger");
    FIND(tointegerx, "lua_tointegerx");
    FIND(testudata, "luaL_testudata");
    FIND(tocfunction, "lua_tocfunction");
    FIND(pushnil, "lua_pushnil");
    FIND(rotate, "lua_rotate");
    FIND(fileresult, "luaL_fileresult");
    FIND(getallocf, "lua_getallocf");
    FIND(setallocf, "lua_setallocf");
#undef FIND
    /* lua_version ignores its argument in 5.4 (it took a state, not NULL, in 5.3). */
    if (api.version(NULL) != 504)
        goto missing;
    if (blank == NULL) {
        void *map = mmap(NULL, BLANK_MAX, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                         -1, 0);
        if (map != MAP_FAILED)
            blank = map;  /* else luanbd_blank_string fails, and payloads take the usual path */
    }
    bound = 1;  /* the handle stays open: lupa's module is never unloaded */
    Py_RETURN_TRUE;
missing:
    memset(&api, 0, sizeof api);
    dlclose(lib);
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_O, "Find the Lua 5.4 C API in the lupa module at this path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "luanbd.lua._lualib", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__lualib(void)
{
    return PyModule_Create(&module);
}
