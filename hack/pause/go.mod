module damops.dev/hack/pause

go 1.22
