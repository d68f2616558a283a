from verimesh._cli import main

main()
