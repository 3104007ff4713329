//go:build afterclose_bug

package main

// deferredRearmBug is true in go-buggy (built with -tags afterclose_bug): the batch's re-arm
// list holds (fd, id) pairs queued before the handler ran, and re-arms them all.
const deferredRearmBug = true
