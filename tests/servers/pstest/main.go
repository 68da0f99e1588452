// Command pstest-server runs Google's in-memory Pub/Sub fake (cloud.google.com/go/pubsub/pstest) for the
// integration tests. It prints its address (127.0.0.1:<port>) on the first line of stdout, then serves
// until it receives SIGINT or SIGTERM.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"cloud.google.com/go/pubsub/pstest"
)

func main() {
	s := pstest.NewServer()
	fmt.Println(s.Addr)
	c := make(chan os.Signal, 1)
	signal.Notify(c, os.Interrupt, syscall.SIGTERM)
	<-c
	s.Close()
}
