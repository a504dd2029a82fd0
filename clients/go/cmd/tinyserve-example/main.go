// Command tinyserve-example calls a tinyserve server through stubs generated from
// proto/tinyserve/v1 (see ../../README.md): it lists the models, streams a Generate, runs one
// Chat turn, tokenizes a text, cancels a stream after two chunks and lets a deadline end one.
// The API key goes in `authorization: Bearer` metadata. Errors print their gRPC code and the
// google.rpc details decoded by type (BadRequest, QuotaFailure, RetryInfo, ErrorInfo), exit 1.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	tinyservev1 "tinyserve.dev/clients/go/gen/tinyserve/v1"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address (plaintext)")
	prompt := flag.String("prompt", "The capital of France is", "prompt for Generate")
	maxTokens := flag.Int("max-tokens", 16, "tokens to generate")
	apiKey := flag.String("api-key", os.Getenv("TINYSERVE_API_KEY"), "API key (servers with a tenants file)")
	timeout := flag.Duration("timeout", 60*time.Second, "deadline of the whole run")
	deadline := flag.Duration("deadline", 20*time.Millisecond, "deadline of the last, long stream")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if *apiKey != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+*apiKey)
	}
	conn, err := grpc.DialContext(ctx, *addr, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	client := tinyservev1.NewTinyServeServiceClient(conn)

	models, err := client.ListModels(ctx, &tinyservev1.ListModelsRequest{})
	if err != nil {
		fail(err)
	}
	fmt.Printf("default model: %s (%d served)\n", models.GetDefaultModel(), len(models.GetModels()))

	zero := float32(0)
	n := int32(*maxTokens)
	stream, err := client.Generate(ctx, &tinyservev1.GenerateRequest{
		Prompt:   *prompt,
		Sampling: &tinyservev1.SamplingParameters{Temperature: &zero},
		Stopping: &tinyservev1.StoppingParameters{MaxTokens: &n},
	})
	if err != nil {
		fail(err)
	}
	for {
		ev, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail(err)
		}
		switch e := ev.GetEvent().(type) {
		case *tinyservev1.GenerateResponse_Start:
			fmt.Printf("request %s, %d prompt tokens\n", e.Start.GetRequestId(), e.Start.GetPromptTokens())
		case *tinyservev1.GenerateResponse_Token:
			fmt.Print(e.Token.GetText())
		case *tinyservev1.GenerateResponse_End:
			fmt.Printf("\nfinish: %s, generated_tokens: %d, time to first token: %v\n",
				e.End.GetFinishReason(), e.End.GetUsage().GetGeneratedTokens(),
				e.End.GetTimeToFirstToken().AsDuration())
		}
	}

	chat, err := client.Chat(ctx, &tinyservev1.ChatRequest{
		Messages: []*tinyservev1.ChatMessage{{Role: "user", Content: "Say hello."}},
		Sampling: &tinyservev1.SamplingParameters{Temperature: &zero},
		Stopping: &tinyservev1.StoppingParameters{MaxTokens: &n},
	})
	if err != nil {
		fail(err)
	}
	answer := ""
	for {
		ev, err := chat.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail(err)
		}
		answer += ev.GetToken().GetText()
		if end := ev.GetEnd(); end != nil {
			fmt.Printf("chat: %q (%s)\n", answer, end.GetFinishReason())
		}
	}

	toks, err := client.Tokenize(ctx, &tinyservev1.TokenizeRequest{Text: "Hello world"})
	if err != nil {
		fail(err)
	}
	fmt.Printf("tokenize: %v\n", toks.GetTokenIds())

	// Cancel: read two chunks, then cancel the call's context; the server stops generating.
	long := int32(200)
	longReq := &tinyservev1.GenerateRequest{
		Prompt:   *prompt,
		Stopping: &tinyservev1.StoppingParameters{MaxTokens: &long, IgnoreEos: true},
	}
	cctx, stop := context.WithCancel(ctx)
	stream, err = client.Generate(cctx, longReq)
	if err != nil {
		fail(err)
	}
	fmt.Printf("cancel: %s\n", status.Code(readUntilError(stream, 2, stop)))

	// Deadline: a stream that cannot finish in time ends with DeadlineExceeded.
	dctx, dcancel := context.WithTimeout(ctx, *deadline)
	defer dcancel()
	stream, err = client.Generate(dctx, longReq)
	if err == nil {
		err = readUntilError(stream, -1, nil)
	}
	fmt.Printf("deadline: %s\n", status.Code(err))
}

// readUntilError reads the stream until it fails; after `cancelAfter` token chunks it calls
// cancel (-1: never). Returns the error (nil if the stream ended normally).
func readUntilError(stream tinyservev1.TinyServeService_GenerateClient, cancelAfter int, cancel func()) error {
	chunks := 0
	for {
		ev, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if ev.GetToken() != nil {
			chunks++
			if chunks == cancelAfter {
				cancel()
			}
		}
	}
}

// fail prints the status and its rich details, one line each, then exits 1. A client branches
// on ErrorInfo.Reason (stable) and waits RetryInfo.RetryDelay before retrying.
func fail(err error) {
	s := status.Convert(err)
	fmt.Fprintf(os.Stderr, "error: %s: %s\n", s.Code(), s.Message())
	for _, d := range s.Details() {
		switch t := d.(type) {
		case *errdetails.BadRequest:
			for _, v := range t.GetFieldViolations() {
				fmt.Fprintf(os.Stderr, "  BadRequest: %s: %s\n", v.GetField(), v.GetDescription())
			}
		case *errdetails.QuotaFailure:
			for _, v := range t.GetViolations() {
				fmt.Fprintf(os.Stderr, "  QuotaFailure: %s: %s\n", v.GetSubject(), v.GetDescription())
			}
		case *errdetails.RetryInfo:
			d := t.GetRetryDelay()
			fmt.Fprintf(os.Stderr, "  RetryInfo: retry in %v\n",
				time.Duration(d.GetSeconds())*time.Second+time.Duration(d.GetNanos()))
		case *errdetails.ErrorInfo:
			keys := make([]string, 0, len(t.GetMetadata()))
			for k := range t.GetMetadata() {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			meta := ""
			for _, k := range keys {
				meta += fmt.Sprintf(" %s=%s", k, t.GetMetadata()[k])
			}
			fmt.Fprintf(os.Stderr, "  ErrorInfo: %s (%s)%s\n", t.GetReason(), t.GetDomain(), meta)
		default:
			fmt.Fprintf(os.Stderr, "  %v\n", d)
		}
	}
	os.Exit(1)
}
