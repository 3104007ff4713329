// go-fixed / go-buggy: an epoll HTTP/1.1 server written against Go's raw syscall package.
//
//	usage: server HOST PORT      (prints READY on stdout once listening)
//
// A Go program makes its system calls itself, never through libc, so the LD_PRELOAD shim
// sees nothing of it: this is the eBPF tracer's target (--tracer=ebpf, which --tracer=auto
// picks for Go binaries).  net/http does not misuse fds; this server runs its own loop with
// syscall.EpollCreate1/EpollCtl/EpollWait, as event-loop libraries written in Go do.
//
// One goroutine on one OS thread runs the loop: epoll_wait(epfd, 128 events, 300 ms).  The
// listener is level-triggered; connections are non-blocking and registered
// EPOLLIN|EPOLLRDHUP|EPOLLONESHOT with data = a connection id (ids start at 1<<20, so they
// are never mistaken for fd numbers).  Each event's connection is served (read what is
// there, answer every complete request with its path as the body), then either closed (EOF,
// error, "Connection: close", 400) or queued for re-arming; after the batch, queued
// connections are re-armed with EPOLL_CTL_MOD and the listener is drained with accept4.
//
// THE BUG (go-buggy, built with -tags afterclose_bug): the re-arm queue is filled before a
// connection is served, with (fd number, id) pairs, and re-armed without looking whether the
// connection was closed meanwhile.  A connection that closed in the batch is re-armed
// anyway: EPOLL_CTL_MOD fails with EBADF (use-after-close) -- or, when the accept at the end
// of the batch was handed the same number, it succeeds and points a stranger's connection at
// the dead connection's id (stale-rearm): the stranger's requests are never answered.
package main

import (
	"bytes"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"sync/atomic"
	"syscall"
)

const (
	maxEvents    = 128
	bufSize      = 8192
	firstConnID  = 1 << 20
	listenerData = 1
	armIn        = syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT
	epollRDHUP   = syscall.EPOLLRDHUP
)

var resp400 = []byte("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n" +
	"Content-Length: 12\r\nConnection: close\r\n\r\nbad request\n")

type conn struct {
	fd         int
	id         uint64
	in         []byte
	out        []byte
	skip       int
	closeAfter bool // answered 400 or "Connection: close"
	peerEOF    bool // the peer sent FIN: answer what came, then close
	closed     bool
}

type rearmItem struct {
	c  *conn
	fd int
	id uint64
}

var (
	epfd   int
	lfd    int
	conns         = map[uint64]*conn{}
	nextID uint64 = firstConnID
	stop   atomic.Bool
)

func eventData(ev *syscall.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

func newEvent(events uint32, data uint64) *syscall.EpollEvent {
	return &syscall.EpollEvent{Events: events, Fd: int32(uint32(data)), Pad: int32(uint32(data >> 32))}
}

func closeConn(c *conn) {
	if c.closed {
		return
	}
	c.closed = true
	_ = syscall.EpollCtl(epfd, syscall.EPOLL_CTL_DEL, c.fd, nil)
	_ = syscall.Close(c.fd)
	delete(conns, c.id)
}

// answer parses one header block ending in CRLFCRLF and queues its answer; false = malformed.
func answer(c *conn, block []byte) bool {
	eol := bytes.Index(block, []byte("\r\n"))
	if eol < 0 {
		return false
	}
	line := block[:eol]
	sp := bytes.IndexByte(line, ' ')
	if sp <= 0 {
		return false
	}
	for _, ch := range line[:sp] {
		if ch < 'A' || ch > 'Z' {
			return false
		}
	}
	rest := line[sp+1:]
	sp2 := bytes.IndexByte(rest, ' ')
	if sp2 <= 0 || rest[0] != '/' {
		return false
	}
	path, version := rest[:sp2], rest[sp2+1:]
	for _, ch := range path {
		if ch <= ' ' || ch >= 0x7f {
			return false
		}
	}
	if len(version) != 8 || !bytes.HasPrefix(version, []byte("HTTP/1.")) ||
		version[7] < '0' || version[7] > '9' {
		return false
	}
	keepAlive, closeHdr, length := false, false, 0
	for _, h := range bytes.Split(block[eol+2:], []byte("\r\n")) {
		if len(h) == 0 {
			break
		}
		colon := bytes.IndexByte(h, ':')
		if colon < 0 {
			return false
		}
		name, value := bytes.ToLower(h[:colon]), bytes.ToLower(bytes.TrimSpace(h[colon+1:]))
		switch string(name) {
		case "connection":
			closeHdr = closeHdr || bytes.Contains(value, []byte("close"))
			keepAlive = keepAlive || bytes.Contains(value, []byte("keep-alive"))
		case "content-length":
			n, err := strconv.Atoi(string(value))
			if err != nil || n < 0 {
				return false
			}
			length = n
		}
	}
	if closeHdr || (version[7] == '0' && !keepAlive) {
		c.closeAfter = true
	}
	c.skip = length
	head := "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " +
		strconv.Itoa(len(path)+1) + "\r\n"
	if c.closeAfter {
		head += "Connection: close\r\n"
	}
	c.out = append(c.out, head+"\r\n"...)
	c.out = append(c.out, path...)
	c.out = append(c.out, '\n')
	return true
}

// serve answers every complete request buffered in c.in.
func serve(c *conn) {
	for !c.closeAfter {
		if c.skip > 0 {
			k := c.skip
			if k > len(c.in) {
				k = len(c.in)
			}
			c.in, c.skip = c.in[k:], c.skip-k
			if c.skip > 0 {
				break
			}
		}
		end := bytes.Index(c.in, []byte("\r\n\r\n"))
		if end < 0 {
			if len(c.in) >= bufSize {
				c.out, c.closeAfter = append(c.out[:0], resp400...), true
			}
			break
		}
		if !answer(c, c.in[:end+4]) {
			c.out, c.closeAfter = append(c.out[:0], resp400...), true
			break
		}
		c.in = c.in[end+4:]
	}
	if c.closeAfter {
		c.in = c.in[:0]
	}
	c.in = append([]byte(nil), c.in...)
}

// flush writes what is pending: 1 all written, 0 would block, -1 broken.
func flush(c *conn) int {
	for len(c.out) > 0 {
		n, err := syscall.Write(c.fd, c.out)
		if n > 0 {
			c.out = c.out[n:]
			continue
		}
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.EAGAIN {
			return 0
		}
		return -1
	}
	c.out = nil
	return 1
}

// handle serves one event; true when the connection stays open and must be re-armed.
func handle(c *conn, events uint32) bool {
	if !c.peerEOF && events&(syscall.EPOLLIN|epollRDHUP|syscall.EPOLLHUP|syscall.EPOLLERR) != 0 {
		buf := make([]byte, bufSize)
		for len(c.in) < bufSize {
			n, err := syscall.Read(c.fd, buf[:bufSize-len(c.in)])
			if n > 0 {
				c.in = append(c.in, buf[:n]...)
				continue
			}
			if err == syscall.EINTR {
				continue
			}
			if err == nil {
				c.peerEOF = true
			} else if err != syscall.EAGAIN {
				closeConn(c) // ECONNRESET: the client's RST
				return false
			}
			break
		}
	}
	if len(c.in) > 0 {
		serve(c)
	}
	switch flush(c) {
	case -1:
		closeConn(c)
		return false
	case 1:
		if c.closeAfter || c.peerEOF {
			closeConn(c)
			return false
		}
	}
	return true
}

func rearm(c *conn, fd int, id uint64) {
	events := uint32(armIn)
	if c != nil && c.peerEOF {
		events = syscall.EPOLLONESHOT
	}
	if c != nil && len(c.out) > 0 {
		events |= syscall.EPOLLOUT
	}
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_MOD, fd, newEvent(events, id)); err != nil {
		if c != nil && !c.closed {
			closeConn(c)
		}
	}
}

func acceptAll() {
	for {
		fd, _, err := syscall.Accept4(lfd, syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC)
		if err == syscall.EINTR || err == syscall.ECONNABORTED {
			continue
		}
		if err != nil {
			return // EAGAIN, or EMFILE: the listener stays level-triggered
		}
		c := &conn{fd: fd, id: nextID}
		nextID++
		if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, fd, newEvent(armIn, c.id)); err != nil {
			_ = syscall.Close(fd)
			continue
		}
		conns[c.id] = c
	}
}

func listen(host string, port int) (int, error) {
	var addr [4]byte
	parts := bytes.Split([]byte(host), []byte("."))
	if len(parts) != 4 {
		return -1, syscall.EINVAL
	}
	for i, p := range parts {
		v, err := strconv.Atoi(string(p))
		if err != nil || v < 0 || v > 255 {
			return -1, syscall.EINVAL
		}
		addr[i] = byte(v)
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1); err != nil {
		return -1, err
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Port: port, Addr: addr}); err != nil {
		return -1, err
	}
	return fd, syscall.Listen(fd, 1024)
}

func fail(what string, err error) {
	os.Stderr.WriteString("go-epoll: " + what + ": " + err.Error() + "\n")
	os.Exit(1)
}

func main() {
	if len(os.Args) != 3 {
		os.Stderr.WriteString("usage: server HOST PORT\n")
		os.Exit(2)
	}
	port, err := strconv.Atoi(os.Args[2])
	if err != nil {
		fail("port", err)
	}
	runtime.LockOSThread()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sigs; stop.Store(true) }()

	if lfd, err = listen(os.Args[1], port); err != nil {
		fail("listen on "+os.Args[1]+":"+os.Args[2], err)
	}
	if epfd, err = syscall.EpollCreate1(syscall.EPOLL_CLOEXEC); err != nil {
		fail("epoll_create1", err)
	}
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, lfd, newEvent(syscall.EPOLLIN, listenerData)); err != nil {
		fail("epoll_ctl", err)
	}
	os.Stdout.WriteString("READY\n")

	events := make([]syscall.EpollEvent, maxEvents)
	var queue []rearmItem
	for !stop.Load() {
		n, err := syscall.EpollWait(epfd, events, 300)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			fail("epoll_wait", err)
		}
		listener := false
		queue = queue[:0]
		for i := 0; i < n; i++ {
			d := eventData(&events[i])
			if d == listenerData {
				listener = true
				continue
			}
			c := conns[d]
			if c == nil {
				continue // an id this loop no longer knows (see THE BUG)
			}
			if deferredRearmBug {
				queue = append(queue, rearmItem{fd: c.fd, id: c.id})
				handle(c, events[i].Events)
			} else if handle(c, events[i].Events) {
				queue = append(queue, rearmItem{c: c, fd: c.fd, id: c.id})
			}
		}
		if listener {
			acceptAll()
		}
		for _, it := range queue {
			if deferredRearmBug {
				rearm(conns[it.id], it.fd, it.id)
			} else if !it.c.closed {
				rearm(it.c, it.fd, it.id)
			}
		}
	}
	for _, c := range conns {
		closeConn(c)
	}
	_ = syscall.Close(epfd)
	_ = syscall.Close(lfd)
}
