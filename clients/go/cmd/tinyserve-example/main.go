// Command tinyserve-example calls a tinyserve server through stubs generated from
// proto/tinyserve/v1 (see ../../README.md): it lists the models, streams a Generate, runs one
// Chat turn and tokenizes a text. Errors print their gRPC code and google.rpc details, exit 1.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

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
}

func fail(err error) {
	s := status.Convert(err)
	fmt.Fprintf(os.Stderr, "error: %s: %s\n", s.Code(), s.Message())
	for _, d := range s.Details() {
		fmt.Fprintf(os.Stderr, "  %v\n", d)
	}
	os.Exit(1)
}
