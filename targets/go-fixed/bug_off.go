//go:build !afterclose_bug

package main

// deferredRearmBug is false in go-fixed: the batch's re-arm list holds connections and skips
// the ones closed since they were queued.
const deferredRearmBug = false
