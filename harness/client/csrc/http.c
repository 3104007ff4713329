/* HTTP/1.x responses out of a byte stream: the same grammar and the same verdicts as
 * harness/protocols/http.py's ResponseParser (strict status line, token header names, the
 * last of a repeated header, chunked, Content-Length, else the body ends at EOF). */
#define _GNU_SOURCE
#include "engine.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_HEADER_BYTES (64 * 1024)

static int is_token(uint8_t ch)
{
    return isalnum(ch) || (ch && strchr("!#$%&'*+.^_`|~-", ch) != NULL);
}

static int is_space(uint8_t ch) { return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n' || ch == '\v' || ch == '\f'; }

static void strip(const uint8_t **s, size_t *n)
{
    while (*n && is_space(**s)) (*s)++, (*n)--;
    while (*n && is_space((*s)[*n - 1])) (*n)--;
}

static int name_is(const uint8_t *s, size_t n, const char *name)
{
    return strlen(name) == n && strncasecmp((const char *)s, name, n) == 0;
}

/* A comma-separated header value, read one item at a time; an empty value holds one empty
 * item. */
struct items {
    const uint8_t *s;
    size_t n;
    int done;
};

/* The next item, stripped, in (p, pn); 0 once every item was read. */
static int next_item(struct items *it, const uint8_t **p, size_t *pn)
{
    if (it->done) return 0;
    const uint8_t *comma = memchr(it->s, ',', it->n);
    size_t part = comma ? (size_t)(comma - it->s) : it->n;
    *p = it->s, *pn = part;
    strip(p, pn);
    if (comma) it->s = comma + 1, it->n -= part + 1;
    else it->done = 1;
    return 1;
}

/* Whether the comma-separated list (s, n) holds the token ``word`` (case-insensitive). */
static int has_token(const uint8_t *s, size_t n, const char *word)
{
    struct items it = {s, n, 0};
    const uint8_t *p;
    size_t pn;
    while (next_item(&it, &p, &pn))
        if (name_is(p, pn, word)) return 1;
    return 0;
}

static int contains_ci(const uint8_t *s, size_t n, const char *word)
{
    size_t w = strlen(word);
    for (size_t i = 0; i + w <= n; i++)
        if (strncasecmp((const char *)s + i, word, w) == 0) return 1;
    return 0;
}

/* Content-Length: every comma-separated value the same string of digits. */
static long content_length(const uint8_t *s, size_t n)
{
    struct items it = {s, n, 0};
    const uint8_t *p, *first = NULL;
    size_t pn, first_n = 0;
    while (next_item(&it, &p, &pn)) {
        if (pn == 0 || pn > 15) return -1;
        for (size_t i = 0; i < pn; i++)
            if (!isdigit(p[i])) return -1;
        if (first && (pn != first_n || memcmp(p, first, pn) != 0)) return -1;
        first = p, first_n = pn;
    }
    return strtol((const char *)first, NULL, 10);
}

static int chunked(const uint8_t *b, size_t n, size_t pos, struct reply *r)
{
    size_t cap = 256, len = 0;
    uint8_t *body = malloc(cap);
    if (!body) return REPLY_GARBAGE;
    for (;;) {
        const uint8_t *eol = memmem(b + pos, n - pos, "\r\n", 2);
        if (!eol) goto more;
        size_t line = (size_t)(eol - (b + pos));
        const uint8_t *semi = memchr(b + pos, ';', line);
        const uint8_t *sz = b + pos;
        size_t szn = semi ? (size_t)(semi - sz) : line;
        strip(&sz, &szn);
        char text[32];
        if (szn == 0 || szn >= sizeof text) goto garbage;
        memcpy(text, sz, szn);
        text[szn] = 0;
        char *end;
        unsigned long size = strtoul(text, &end, 16);
        if (*end) goto garbage;
        pos += line + 2;
        if (size == 0) {
            for (;;) { /* trailers up to the empty line */
                eol = memmem(b + pos, n - pos, "\r\n", 2);
                if (!eol) goto more;
                int empty = eol == b + pos;
                pos = (size_t)(eol - b) + 2;
                if (empty) {
                    r->body = body, r->body_len = len, r->owned = 1, r->consumed = pos;
                    return REPLY_OK;
                }
            }
        }
        if (n < pos + size + 2) goto more;
        if (len + size > cap) {
            while (len + size > cap) cap *= 2;
            uint8_t *grown = realloc(body, cap);
            if (!grown) goto garbage;
            body = grown;
        }
        memcpy(body + len, b + pos, size);
        len += size;
        if (b[pos + size] != '\r' || b[pos + size + 1] != '\n') goto garbage;
        pos += size + 2;
    }
more:
    free(body);
    return REPLY_MORE;
garbage:
    free(body);
    r->partial_len = n;
    return REPLY_GARBAGE;
}

int http_next(const uint8_t *b, size_t n, int eof, struct reply *r)
{
    memset(r, 0, sizeof *r);
    if (n == 0) return REPLY_MORE;
    if (memcmp(b, "HTTP/", n < 5 ? n : 5) != 0) goto garbage_all;
    const uint8_t *head_end = memmem(b, n, "\r\n\r\n", 4);
    if (!head_end) {
        if (n > MAX_HEADER_BYTES) goto garbage_all;
        return REPLY_MORE;
    }
    size_t head = (size_t)(head_end - b);
    r->partial_len = head; /* a bad head: the partial bytes are the head alone */
    const uint8_t *eol = memmem(b, head, "\r\n", 2);
    size_t first = eol ? (size_t)(eol - b) : head;
    /* HTTP/d.d ddd[ reason] */
    if (first < 12 || !isdigit(b[5]) || b[6] != '.' || !isdigit(b[7]) || b[8] != ' ')
        return REPLY_GARBAGE;
    if (!isdigit(b[9]) || !isdigit(b[10]) || !isdigit(b[11])) return REPLY_GARBAGE;
    if (first > 12 && b[12] != ' ') return REPLY_GARBAGE;
    for (size_t i = 12; i < first; i++)
        if (b[i] == '\r' || b[i] == '\n') return REPLY_GARBAGE;
    r->status = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
    int http10 = b[5] == '1' && b[7] == '0';
    const uint8_t *conn_v = NULL, *te_v = NULL, *cl_v = NULL;
    size_t conn_n = 0, te_n = 0, cl_n = 0;
    size_t pos = first + 2;
    while (pos < head + 2 && first < head) {
        const uint8_t *e = memmem(b + pos, head - pos, "\r\n", 2);
        size_t line = e ? (size_t)(e - (b + pos)) : head - pos;
        const uint8_t *s = b + pos;
        const uint8_t *colon = memchr(s, ':', line);
        if (!colon || colon == s) return REPLY_GARBAGE;
        for (const uint8_t *p = s; p < colon; p++)
            if (!is_token(*p)) return REPLY_GARBAGE;
        size_t name_n = (size_t)(colon - s);
        const uint8_t *v = colon + 1;
        size_t vn = line - name_n - 1;
        strip(&v, &vn);
        if (name_is(s, name_n, "connection")) conn_v = v, conn_n = vn;
        else if (name_is(s, name_n, "transfer-encoding")) te_v = v, te_n = vn;
        else if (name_is(s, name_n, "content-length")) cl_v = v, cl_n = vn;
        pos += line + 2;
        if (!e) break;
    }
    r->keep_alive = http10 ? (conn_v && has_token(conn_v, conn_n, "keep-alive"))
                           : !(conn_v && has_token(conn_v, conn_n, "close"));
    size_t body = head + 4;
    if ((r->status >= 100 && r->status < 200) || r->status == 204 || r->status == 304) {
        r->body = b + body, r->body_len = 0, r->consumed = body;
        return REPLY_OK;
    }
    if (te_v && contains_ci(te_v, te_n, "chunked")) return chunked(b, n, body, r);
    if (cl_v) {
        long len = content_length(cl_v, cl_n);
        if (len < 0) goto garbage_all;
        if (n < body + (size_t)len) return REPLY_MORE;
        r->body = b + body, r->body_len = (size_t)len, r->consumed = body + (size_t)len;
        return REPLY_OK;
    }
    if (!eof) return REPLY_MORE;
    r->body = b + body, r->body_len = n - body, r->consumed = n;
    return REPLY_OK;
garbage_all:
    r->partial_len = n;
    return REPLY_GARBAGE;
}
